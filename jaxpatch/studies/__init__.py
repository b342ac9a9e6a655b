"""Studies built on the library: what jaxpatch measures about itself and about pairs, not what a
researcher calls to measure their own pair.

    evaluate      every localization method scored against a planted set (the demo)
    report        the demo's summary, HTML report and the files behind it
    merge_eval    merging evaluated on a planted pair's experts
    scoring       planted sets as patches, and labels for scoring rankings against them
    pairs/        the shipped planted pair (built by `python -m experiments.planted`)

The library never imports a study; studies import the library, and `experiments/` (which builds
pairs) imports both.
"""

__all__: list[str] = []
