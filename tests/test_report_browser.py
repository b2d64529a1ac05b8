"""Open a generated report in headless Chromium: every image decodes and the tables render.

Skips where no Chromium is installed (CI's .ci/run installs the Debian package ``chromium``).
The page itself needs no JavaScript; a small inline script writes whether every <img> loaded
(complete and naturalWidth > 0) into ``<body data-images-ok=...>``, which --dump-dom shows.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_report import PageParser, make_analysis, make_metrics

from flatlab.report import write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


def dump_dom(page, tmp_path) -> str:
    """The DOM of ``page`` after load, as headless Chromium serialises it."""
    profile = tmp_path / f"profile-{page.parent.name}"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", "--dump-dom",
               "--virtual-time-budget=5000", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def body_marks(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))


def test_every_image_loads_and_tables_render(tmp_path):
    analysis = make_analysis()
    page = write_report(analysis, tmp_path / "report", metrics=make_metrics())
    dom = dump_dom(page, tmp_path)
    marks = body_marks(dom)
    assert marks == {"images-total": "6", "images-loaded": "6", "images-ok": "true"}
    parsed = PageParser()
    parsed.feed(dom)
    summary = parsed.tables["summary"]
    assert len(summary) == 1 + len(analysis["checkpoints"])
    assert [row[0] for row in summary[1:]] == ["sam", "sgd (baseline)", "nso"]
    assert "81.25" in summary[3] and "-75.0%" in summary[3]
    assert len(parsed.tables["provenance"]) == 1 + len(analysis["checkpoints"])


def test_a_missing_image_is_detected(tmp_path):
    """The check can fail: delete one figure and the browser reports it."""
    page = write_report(make_analysis(), tmp_path / "broken", metrics=make_metrics())
    (page.parent / "figures" / "density.png").unlink()
    marks = body_marks(dump_dom(page, tmp_path))
    assert marks == {"images-total": "6", "images-loaded": "5", "images-ok": "false"}
