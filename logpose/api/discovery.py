"""Serialised discovery answers, kept until their service changes."""

from __future__ import annotations

import json

from logpose.api.views import instance_view
from logpose.registry import Change, Registry

MAX_CACHED_SERVICES = 10000


class DiscoveryCache:
    """The JSON body of ``GET /api/discover/{code}`` per service, as bytes.

    An entry is dropped by the registry change that touches its service (a
    change for service "" drops all), so a read after a change returns the new body.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._bodies: dict[str, bytes] = {}
        registry.subscribe(self._on_change)

    def body(self, code: str, service_name: str) -> bytes:
        body = self._bodies.get(code)
        if body is None:
            views = [instance_view(instance, service_name) for instance in self._registry.discoverable(code)]
            body = json.dumps(views).encode()
            if len(self._bodies) >= MAX_CACHED_SERVICES:
                self._bodies.pop(next(iter(self._bodies)))
            self._bodies[code] = body
        return body

    def _on_change(self, change: Change) -> None:
        if change.service:
            self._bodies.pop(change.service, None)
        else:
            self._bodies.clear()
