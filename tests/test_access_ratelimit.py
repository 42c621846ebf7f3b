"""Brute-force protection of token requests: the limiter alone, then a real server."""

from __future__ import annotations

import httpx

from logpose.auth import MAX_TOKEN_FAILURES, TOKEN_FAILURE_WINDOW
from logpose.ratelimit import FailureLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ----- the limiter --------------------------------------------------------------------

def test_limiter_blocks_at_limit():
    clock = FakeClock()
    limiter = FailureLimiter(3, 60.0, clock=clock)
    assert [limiter.record_failure("k") for _ in range(3)] == [False, False, True]
    assert limiter.retry_after("k") == 60
    assert limiter.retry_after("other") == 0


def test_limiter_window_slides():
    clock = FakeClock()
    limiter = FailureLimiter(3, 60.0, clock=clock)
    for step in range(3):
        clock.now = 1000.0 + step * 10
        limiter.record_failure("k")
    clock.now = 1030.0
    assert limiter.retry_after("k") == 30
    clock.now = 1060.0  # the first failure has left the window
    assert limiter.retry_after("k") == 0
    limiter.record_failure("k")
    assert limiter.retry_after("k") == 10


def test_limiter_reset_forgets_key():
    limiter = FailureLimiter(2, 60.0, clock=FakeClock())
    limiter.record_failure("k")
    limiter.record_failure("k")
    limiter.reset("k")
    assert limiter.retry_after("k") == 0


def test_limiter_table_is_bounded():
    clock = FakeClock()
    limiter = FailureLimiter(2, 60.0, max_keys=100, clock=clock)
    limiter.record_failure("old")
    limiter.record_failure("old")
    for number in range(500):
        limiter.record_failure(f"key{number}")
    assert len(limiter) == 100
    assert limiter.retry_after("old") == 0  # evicted as the least recently failed key


def test_limiter_drops_expired_keys_first():
    clock = FakeClock()
    limiter = FailureLimiter(2, 60.0, max_keys=3, clock=clock)
    limiter.record_failure("stale")
    clock.now += 61
    limiter.record_failure("blocked")
    limiter.record_failure("blocked")
    limiter.record_failure("fresh")
    limiter.record_failure("newest")  # the table is full: "stale" goes, "blocked" stays
    assert limiter.retry_after("blocked") > 0
    assert len(limiter) == 3


# ----- a real server ------------------------------------------------------------------

def token_request(server, common_name: str, secret: str, source: str = "127.0.0.1") -> httpx.Response:
    # A second loopback source address separates the per-address limit from the per-name one.
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.post(server.url + "/api/auth/token", json={"common_name": common_name, "secret": secret})


def test_failures_block_common_name_and_address(server):
    wrong = "wrong-secret-0123456789"
    for attempt in range(MAX_TOKEN_FAILURES):
        assert token_request(server, "admin", wrong).status_code == 401, attempt

    blocked = token_request(server, "admin", server.admin_secret())
    assert blocked.status_code == 429
    assert blocked.headers["content-type"].startswith("application/problem+json")
    assert 1 <= int(blocked.headers["Retry-After"]) <= TOKEN_FAILURE_WINDOW
    assert blocked.json()["type"] == "urn:logpose:problem:too-many-requests"

    # The same name from another address is blocked too; another name from there is not.
    assert token_request(server, "admin", server.admin_secret(), source="127.0.0.2").status_code == 429
    assert token_request(server, "someone-else", wrong, source="127.0.0.2").status_code == 401
    # Any name from the blocked address is blocked.
    assert token_request(server, "someone-else", wrong).status_code == 429

    log = server.log()
    assert "'admin' from 127.0.0.1" in log
    assert wrong not in log
    assert server.admin_secret() not in log


def test_failures_spread_over_names_block_address(server):
    for attempt in range(MAX_TOKEN_FAILURES):
        assert token_request(server, f"guess{attempt}", "wrong").status_code == 401

    assert token_request(server, "admin", server.admin_secret()).status_code == 429
    assert token_request(server, "admin", server.admin_secret(), source="127.0.0.2").status_code == 200


def test_success_clears_common_name_failures(server):
    for _attempt in range(MAX_TOKEN_FAILURES - 1):
        assert token_request(server, "admin", "wrong", source="127.0.0.3").status_code == 401
    assert token_request(server, "admin", server.admin_secret(), source="127.0.0.4").status_code == 200

    assert token_request(server, "admin", "wrong", source="127.0.0.4").status_code == 401
    assert token_request(server, "admin", server.admin_secret(), source="127.0.0.4").status_code == 200
