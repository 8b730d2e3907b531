"""Open a page in a real headless Chromium and look at the screenshot, as a person would.

`scripts/setup.sh` installs Debian's `chromium-headless-shell` where it can; a machine without
it gets a failure that says how to install it (not a skip: a report nobody saw render is not
tested).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: matplotlib's first two colours: the rollout report's weight lines (stable, candidate).
CHART_COLOURS = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E))


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise AssertionError("no headless Chromium on PATH: `apt-get install chromium-headless-shell` "
                         "(scripts/setup.sh does it where it runs as root or with sudo)")


def screenshot(page: Path, out: Path, width: int = 1100, height: int = 1600) -> Path:
    """A PNG screenshot of `page` (a local file) rendered by headless Chromium."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return out


def colour_share(png: Path, colour: tuple[int, int, int], tolerance: int = 24) -> float:
    """The share of the screenshot's pixels within `tolerance` of `colour` (per channel)."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    pixels = list(img.getdata())
    near = sum(1 for p in pixels if all(abs(a - b) <= tolerance for a, b in zip(p, colour)))
    return near / len(pixels)


def non_white_share(png: Path) -> float:
    from PIL import Image

    img = Image.open(png).convert("L")
    pixels = list(img.getdata())
    return sum(1 for p in pixels if p < 235) / len(pixels)
