"""docs/merging.md's table: `jaxpatch.studies.merge_eval` on the shipped planted pair's three experts.

    python scripts/merging_table.py          # about a minute on 2 cores

Writes the per-combination table between the markers of docs/merging.md and the whole document
to docs/merge_eval.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxpatch.studies.evaluate import default_pair_dir  # noqa: E402
from jaxpatch.studies.merge_eval import merge_eval, table  # noqa: E402

START, END = "<!-- merge-eval-table:start -->", "<!-- merge-eval-table:end -->"


def main() -> int:
    document = merge_eval(default_pair_dir(), progress=lambda c: print(f"merged {c}", flush=True))
    document["pair"] = "jaxpatch/studies/pairs/default"
    (ROOT / "docs" / "merge_eval.json").write_text(json.dumps(document, indent=1) + "\n")
    markdown = table(document)
    print(markdown)
    doc = ROOT / "docs" / "merging.md"
    text = doc.read_text()
    head, rest = text.split(START)
    doc.write_text(head + START + "\n" + markdown + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
