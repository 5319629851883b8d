"""Admission for the ingress: at most `limit` model requests in progress per replica; the rest shed at once.

A shed request gets 503 with a Retry-After of how long an admitted request has recently spent in its slot.
By Little's law that time is what the work in progress needs to turn over (in flight / completion rate),
so clients told to come back then find free slots; a fixed "1 s" sends a burst straight back into a
queue that takes longer than that to clear. The configured `retry_after_s` is the floor, MAX_RETRY_AFTER_S
the ceiling. Time in the slot is measured per request, so idle periods do not distort it (a rate
measured over recent completions would read an idle hour as a slow service).

One instance per ingress replica, used from its single event loop: no lock. `AdmissionGate` applies it as
pure ASGI middleware, before FastAPI routes, authorises or validates anything: a request shed under load
then costs the ingress as little as it can (Serve's proxy hop remains; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import ApiError, error_response, retry_after

MAX_RETRY_AFTER_S = 30.0
SMOOTHING = 0.2  # weight of the newest request in the moving average of time in the slot


class Admission:
    """Counts admitted model requests; `slot()` admits one or raises a 503 ApiError with Retry-After."""

    def __init__(
        self, limit: int, retry_after_s: float, clock: Callable[[], float] = time.monotonic, where: str = "ingress"
    ) -> None:
        self.limit, self.floor_s, self._clock, self.where = limit, retry_after_s, clock, where
        self.inflight = 0
        self.slot_s: float | None = None  # moving average of an admitted request's time in its slot

    def retry_after_s(self) -> float:
        """The Retry-After for a request shed now: recent time in the slot, within [floor, ceiling]."""
        return min(MAX_RETRY_AFTER_S, max(self.floor_s, self.slot_s or 0.0))

    def check(self) -> None:
        """Raise the 503 ApiError if no slot is free."""
        if self.inflight >= self.limit:
            wait = self.retry_after_s()
            busy = f"{self.limit} requests in progress at the {self.where}"
            detail = f"at capacity ({busy}); retry in {math.ceil(wait)} s"
            raise ApiError(503, "overloaded", detail, retry_after(wait))

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a slot for the duration of the block, or raise the 503 ApiError."""
        self.check()
        self.inflight += 1
        start = self._clock()
        try:
            yield
        finally:
            self.inflight -= 1
            took = self._clock() - start
            self.slot_s = took if self.slot_s is None else (1 - SMOOTHING) * self.slot_s + SMOOTHING * took


class AdmissionGate:
    """ASGI middleware: a POST to one of `routes` runs inside an admission slot or gets the JSON 503 at once.

    The Admission is the one given (Serve's proxy: serve/proxy_gate.py) or else `app.state.admission` (set
    by the ingress replica); until it is set, or for any other route (/healthz, the page, the docs),
    requests pass straight through.
    """

    def __init__(self, app: ASGIApp, routes: tuple[str, ...], admission: Admission | None = None) -> None:
        self.app, self.routes, self.admission = app, routes, admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission: Admission | None = None
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith(self.routes):
            admission = self.admission or getattr(scope["app"].state, "admission", None)
        if admission is None:
            await self.app(scope, receive, send)
            return
        try:
            admission.check()
        except ApiError as exc:
            await error_response(exc.status, exc.code, exc.detail, exc.headers)(scope, receive, send)
            return
        with admission.slot():
            await self.app(scope, receive, send)
