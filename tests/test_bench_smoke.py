"""The prober benchmark in bench/ runs end to end in its short CI mode.

No timing is asserted: the machine running the tests is shared and noisy.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from conftest import run_bench_smoke

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "probe_scale.py"
SMOKE_TIMEOUT = 90.0  # seconds; the smoke run takes about 25 s on a loaded 2-core machine

DNSPERF_OUTPUT = """\
Statistics:

  Queries sent:         22275
  Queries completed:    22270 (99.98%)
  Queries lost:         5 (0.02%)

  Response codes:       NOERROR 11138 (50.01%), NXDOMAIN 11132 (49.99%)
  Average packet size:  request 47, response 97
  Run time (s):         5.019357
  Queries per second:   4437.819426
"""


@pytest.fixture
def probe_scale(monkeypatch):
    """Import bench/probe_scale.py from its folder, which is not a package.

    The folder stays on sys.path during the test because processes started
    with the "spawn" method import the module again by name.
    """
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("probe_scale")


def test_smoke_run_prints_table(tmp_path):
    stdout = run_bench_smoke(SCRIPT, SMOKE_TIMEOUT, tmp_path)
    assert "instances (listening / closed)  " in stdout
    assert "200 (100 / 100)" in stdout
    assert "all classified, after last registration" in stdout
    assert "CPU per interval, prober (difference)" in stdout
    assert "DNS queries/s, probing server" in stdout
    assert "DNS queries/s, idle server" in stdout
    assert "DNS rate ratio, probing / idle" in stdout


def test_dnsperf_output_parsed(probe_scale):
    run = probe_scale.parse_dnsperf(DNSPERF_OUTPUT)

    assert run.sent == 22275
    assert run.completed == 22270
    assert run.lost == 5
    assert run.queries_per_second == pytest.approx(4437.819426)
    assert run.response_codes == {"NOERROR": 11138, "NXDOMAIN": 11132}


def test_python_dns_load_answered(probe_scale, server, api):
    """The fallback load generator, used when dnsperf is missing, counts real responses."""
    answer = api.post("/api/services/bench/instances", json={"address": f"127.0.0.1:{server.http_port}", "protocol": "Tcp"})
    assert answer.status_code == 201, answer.text
    queries = probe_scale.dns_queries(["bench", "missing"])

    run = probe_scale.run_python_load(server.dns_port, queries, 1.0)

    assert run.sent > 0
    assert run.completed + run.lost == run.sent
    assert run.completed > 0
    assert set(run.response_codes) <= {"NOERROR", "NXDOMAIN"}
    assert run.queries_per_second > 0
