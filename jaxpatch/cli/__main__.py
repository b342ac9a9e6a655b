"""`python -m jaxpatch.cli ...`: the `jaxpatch` command."""

import sys

from jaxpatch.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
