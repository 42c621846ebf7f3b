"""The HTTP benchmark still runs end to end (no timing thresholds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "http_bench.py"


def test_http_bench_smoke_prints_ratios():
    if shutil.which("wrk") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("wrk is required in CI; .ci/run installs it")
        pytest.skip("wrk is not installed (Debian package wrk)")
    result = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "| GET /api/discover, requests/s |" in result.stdout
    assert "| registrations/s, 32 connections |" in result.stdout
