"""Render a report page to PNG with headless Chromium (``lowbit report OUT --screenshot PNG``).

Proof that ``report.html`` displays in a real browser: CI runs it once and keeps the PNG. Chromium
is a system package (Debian ``chromium``), not a Python dependency, so only this command needs it;
``make test`` does not. Runs ``chromium --headless --no-sandbox`` (``--no-sandbox``: CI runs as
root) with a throw-away profile directory; the PNG is written atomically.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from lowbit.files.fsutil import atomic_path
from lowbit.errors import LowbitError

__all__ = ["BROWSERS", "find_browser", "screenshot"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 3600)  # CSS pixels: the page is 1180 wide; tall enough for the summary, tables and plots
TIMEOUT_S = 180


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise LowbitError("--screenshot needs headless Chromium on PATH (Debian: apt-get install chromium)")


def screenshot(html_file: Path, png: Path, window: tuple[int, int] = WINDOW) -> Path:
    """Load ``html_file`` in headless Chromium and save the window as ``png``."""
    browser = find_browser()
    html_file = Path(html_file).resolve()
    if not html_file.is_file():
        raise LowbitError(f"{html_file}: no such report page")
    with atomic_path(png) as tmp, tempfile.TemporaryDirectory(prefix="lowbit-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
               f"--screenshot={tmp}", html_file.as_uri()]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise LowbitError(f"{browser} did not render {html_file.name} within {TIMEOUT_S} s") from e
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LowbitError(f"{browser} failed to render {html_file.name} (exit {proc.returncode}): {last}")
    return Path(png)
