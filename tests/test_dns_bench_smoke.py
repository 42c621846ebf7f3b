"""The DNS benchmark in bench/ runs end to end in its short CI mode.

It needs dnsperf and nsd. No timing is asserted: the machine running the tests
is shared and noisy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import run_bench_smoke

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "dns_bench.py"
SMOKE_TIMEOUT = 180.0  # seconds; the smoke run takes about 30 s on a loaded 2-core machine


def require_programs() -> None:
    missing = [program for program in ("dnsperf", "nsd") if shutil.which(program) is None]
    if not missing:
        return
    message = f"{' and '.join(missing)} not installed (Debian packages dnsperf and nsd)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def test_smoke_run_prints_table(tmp_path):
    require_programs()
    stdout = run_bench_smoke(SCRIPT, SMOKE_TIMEOUT, tmp_path)
    assert "queries/s, LogPose" in stdout
    assert "queries/s, NSD" in stdout
    assert "queries/s, dnslib" in stdout
    assert "ratio LogPose / NSD" in stdout
    assert "ratio LogPose / dnslib" in stdout
    assert "median latency at 1000/s, LogPose" in stdout
    assert "freshness, all changes" in stdout
    assert "scale: start-up to /healthz" in stdout
    scale_answer = next(line for line in stdout.splitlines() if line.startswith("scale: first A answer"))
    assert "RCODE 0" in scale_answer
