"""`mergekit-yaml` with stable sorts: the reference for merges whose cuts fall among equal
magnitudes.

mergekit picks TIES' and Model Breadcrumbs' elements with `torch.argsort` / `torch.sort`,
which do not promise an order among equal values (torch's CPU sort puts ties in an order of
its own); task vectors of fine-tuned checkpoints hold many equal magnitudes (float32
differences of nearby weights fall on a grid), so which of them a cut keeps is up to the sort.
This runs mergekit unchanged with `stable=True` forced on both, the order jaxpatch's
`magnitude_mask` reproduces (TIES: equal magnitudes earlier first; breadcrumbs, which sorts
ascending: later first), so the two can be compared element for element.

Needs the `reference` extra (mergekit):     pip install -e ".[reference]"
Run (the arguments of mergekit-yaml):       python scripts/mergekit_stable.py merge.yml OUT
"""

from __future__ import annotations

import sys
from typing import Any


def stable_sorts() -> None:
    """Makes `torch.sort` and `torch.argsort` stable for the rest of this process."""
    import torch  # pyright: ignore[reportMissingImports]  (the reference extra)

    sort = torch.sort

    def stable_sort(input: Any, dim: int = -1, descending: bool = False, stable: bool = False,
                    **kwargs: Any) -> Any:
        return sort(input, dim=dim, descending=descending, stable=True, **kwargs)

    def stable_argsort(input: Any, dim: int = -1, descending: bool = False,
                       stable: bool = False) -> Any:
        return sort(input, dim=dim, descending=descending, stable=True).indices

    torch.sort = stable_sort  # type: ignore[assignment]
    torch.argsort = stable_argsort  # type: ignore[assignment]


if __name__ == "__main__":
    stable_sorts()
    from mergekit.scripts.run_yaml import main  # pyright: ignore[reportMissingImports]

    sys.argv[0] = "mergekit-yaml"
    sys.exit(main())
