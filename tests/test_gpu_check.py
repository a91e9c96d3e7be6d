"""The prepared GPU check (bench/gpu_check.py) runs end to end: here in its CPU dry run on the tiny model.

No GPU exists on this machine or in CI, so the captured-step parts fall back to eager; what this proves is
that the script itself works (dependency check, every section, JSON and markdown out), so the few minutes of
GPU time it is written for are not spent on a bug in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--sessions", "1,2",
                             "--repeats", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}
    assert report["exactness"] == {"frames": 24, "identical": True}
    assert [row["sessions"] for row in report["sweep"]] == [1, 2]
    assert report["time_to_first_audio"]["eager_ms"] > 0 and report["batch1"]["eager_rtf"] > 0
    assert "| sessions |" in (tmp_path / "gpu_check.md").read_text()
