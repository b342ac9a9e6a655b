"""Screenshots of a demo report in a real browser (headless Chromium), at the widths a reader
uses: the first screen (what a reader sees before scrolling) and the whole page, at 1400 and
800 pixels wide.

Needs Chromium (Debian: `apt-get install chromium`). Writes PNGs beside the report:
`report-1400-first.png`, `report-1400-full.png`, `report-800-first.png`, `report-800-full.png`.

    jaxpatch demo --out run && python scripts/report_screenshot.py run/report.html
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

WIDTHS = (1400, 800)
FIRST_SCREEN = 900  # pixels of height a laptop shows before scrolling
FULL_PAGE = 12000  # tall enough for the whole report


def chromium() -> str:
    """The Chromium executable, or an exit naming what to install."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: install it (Debian: apt-get install chromium)")


def screenshot(browser: str, page: Path, out: Path, width: int, height: int) -> None:
    """One headless screenshot of `page` at `width` x `height`."""
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={out}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.html written by jaxpatch demo")
    args = parser.parse_args()
    if not args.report.is_file():
        raise SystemExit(f"{args.report}: not found")
    browser = chromium()
    for width in WIDTHS:
        for kind, height in (("first", FIRST_SCREEN), ("full", FULL_PAGE)):
            out = args.report.with_name(f"report-{width}-{kind}.png")
            screenshot(browser, args.report, out, width, height)
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
