"""A bounded, in-memory count of recent failures per key, for brute-force protection."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from typing import Callable

DEFAULT_MAX_KEYS = 10_000


class FailureLimiter:
    """Block a key after ``max_failures`` failures within ``window`` seconds (a sliding window).

    At most ``max_keys`` keys are tracked. When the table is full, keys whose
    failures have all left the window go first, then the key that failed least
    recently, so memory stays bounded whatever the number of distinct keys.
    The state lives in this process only.
    """

    def __init__(
        self,
        max_failures: int,
        window: float,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._window = window
        self._max_keys = max_keys
        self._clock = clock
        # Ordered from the least to the most recently failed key.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, key: str) -> int:
        """Return the whole seconds until ``key`` may try again, or 0 when it is not blocked."""
        times = self._failures.get(key)
        if times is None:
            return 0
        now = self._clock()
        self._drop_expired(times, now)
        if not times:
            del self._failures[key]
            return 0
        if len(times) < self._max_failures:
            return 0
        return max(1, math.ceil(times[0] + self._window - now))

    def record_failure(self, key: str) -> bool:
        """Count one failure of ``key``; return True when this failure blocks the key."""
        now = self._clock()
        times = self._failures.get(key)
        if times is None:
            self._make_room(now)
            times = self._failures[key] = deque(maxlen=self._max_failures)
        else:
            self._failures.move_to_end(key)
        self._drop_expired(times, now)
        times.append(now)
        return len(times) == self._max_failures

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)

    def _drop_expired(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self._window:
            times.popleft()

    def _make_room(self, now: float) -> None:
        if len(self._failures) < self._max_keys:
            return
        for key in [key for key, times in self._failures.items() if not times or times[-1] <= now - self._window]:
            del self._failures[key]
        while len(self._failures) >= self._max_keys:
            self._failures.popitem(last=False)
