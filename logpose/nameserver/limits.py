"""A per-source response rate limit for UDP, against reflection and amplification abuse."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

DEFAULT_MAX_SOURCES = 10_000


class ResponseRateLimiter:
    """A token bucket per source address: ``rate`` responses per second, bursts up to ``rate``.

    A spoofed UDP query makes the server send its response to the victim whose address
    was forged, so responses are limited per destination address. TCP needs no limit
    because its handshake proves the address. At most ``max_sources`` buckets are kept.
    A new source at a full table makes the least recently seen one forgotten, so memory
    stays bounded whatever the number of forged addresses. A forgotten source starts
    again with a full bucket.
    """

    def __init__(
        self,
        rate: int,
        max_sources: int = DEFAULT_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 1:
            raise ValueError(f"rate must be at least 1 response per second, got {rate}")
        if max_sources < 1:
            raise ValueError(f"max_sources must be at least 1, got {max_sources}")
        self._rate = float(rate)
        self._max_sources = max_sources
        self._clock = clock
        # source -> (tokens, time of the last refill), least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str) -> bool:
        """Take one token from ``source``'s bucket; return False when it is empty."""
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max_sources:
                self._buckets.popitem(last=False)
            tokens = self._rate
        else:
            self._buckets.move_to_end(source)
            tokens = min(self._rate, bucket[0] + (now - bucket[1]) * self._rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
