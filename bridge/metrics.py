"""What the bridge reports about its work, as one small protocol the service implements
(service/metrics.py exports it to Prometheus). The bridge calls it a few times per request, so
an implementation must be cheap: no I/O, no allocation it can avoid. `NoMetrics` reports nothing.
"""
from __future__ import annotations

from typing import Protocol


class BridgeMetrics(Protocol):
    def request(self, surface: str, model: str, status: int, overhead_s: float,
                ttft_s: float | None) -> None:
        """A request ended (served or refused): its status, the time the bridge itself spent on
        it (not waiting for the upstream) and, for a stream, its time to first token."""

    def usage(self, model: str, prompt: int, cached: int, completion: int, credits: int) -> None:
        """A settlement was written: the tokens it recorded and the credits it billed."""

    def settled(self, lag_s: float) -> None:
        """Seconds between a request's end and its settlement being written."""

    def refused(self, window: str) -> None:
        """An admission refused because a window ('5h' or 'week') is full."""

    def upstream_error(self, profile: str, code: str) -> None:
        """An upstream attempt failed (a Z.ai code, or the error's kind)."""

    def stream(self, delta: int) -> None:
        """A stream to a client opened (+1) or closed (-1)."""


class NoMetrics:
    def request(self, surface: str, model: str, status: int, overhead_s: float,
                ttft_s: float | None) -> None:
        pass

    def usage(self, model: str, prompt: int, cached: int, completion: int, credits: int) -> None:
        pass

    def settled(self, lag_s: float) -> None:
        pass

    def refused(self, window: str) -> None:
        pass

    def upstream_error(self, profile: str, code: str) -> None:
        pass

    def stream(self, delta: int) -> None:
        pass
