"""A log line that one packet could trigger at packet rate, limited to one per interval."""

from __future__ import annotations

import time
from typing import Callable


class LogThrottle:
    """Decide whether a repeated log line may be written now, counting the ones held back.

    ``ready()`` returns None while the interval since the last written line runs, and
    otherwise the number of lines held back since then, which the caller writes in its
    line so nothing goes unreported.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._held_back = 0

    def ready(self) -> int | None:
        now = self._clock()
        if now < self._next:
            self._held_back += 1
            return None
        held_back, self._held_back = self._held_back, 0
        self._next = now + self._interval
        return held_back
