"""The report as a reader sees it: rendered by headless Chromium, screenshotted, and measured."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from eval import report
from tests.test_report import make_rl_run_dir

BROWSER = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no headless Chromium: apt-get install chromium (.ci/run does)"
)
VIEWPORT = (900, 1200)
# Runs after the images load; --dump-dom then prints the measurements in the body's data-probe.
PROBE = """<script>
addEventListener("load", () => {
  const boxes = [...document.querySelectorAll(".wide")];
  document.body.dataset.probe = JSON.stringify({
    viewport: innerWidth,
    page: document.documentElement.scrollWidth,
    widest_table: Math.max(...boxes.map(box => box.scrollWidth)),
    widest_box: Math.max(...boxes.map(box => box.clientWidth)),
    headings: [...document.querySelectorAll("h2")].map(h => h.textContent),
    broken_images: [...document.images].filter(i => !i.naturalWidth).map(i => i.alt),
  });
});
</script>"""


def chromium(page: Path, profile: Path, *args: str) -> str:
    """Run headless Chromium on a local page; its stdout."""
    assert BROWSER is not None
    result = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, page.as_uri()],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


def test_report_fits_the_window_and_keeps_its_sections_in_order(tmp_path: Path) -> None:
    path = report.write_report(make_rl_run_dir(tmp_path), writer="report")
    probe = path.with_name("probe.html")
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    screenshot = tmp_path / "report.png"

    chromium(path, tmp_path / "profile", f"--window-size={VIEWPORT[0]},4000",
             f"--screenshot={screenshot}")  # fmt: skip
    dom = chromium(probe, tmp_path / "profile", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
                   "--dump-dom")  # fmt: skip

    print(f"screenshot: {screenshot}")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(screenshot.read_bytes()[16:20], "big") == VIEWPORT[0]
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, dom[-2000:]
    measured = json.loads(unescape(found.group(1)))
    assert (
        measured["widest_table"] > measured["widest_box"]
    )  # the eval table is wider than the page
    assert measured["page"] <= measured["viewport"]  # ...and scrolls inside its box, not the page
    assert measured["headings"] == [
        "Stages", "Training curves", "RL: reward over-optimisation", "Evaluation", "Greedy samples"
    ]  # fmt: skip
    assert measured["broken_images"] == []
