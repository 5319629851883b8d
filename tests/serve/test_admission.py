"""The ingress's admission (serve/admission.py) on a hand-driven clock: no Ray, no HTTP (those are in
test_config.py's overload test and test_hardening.py's slow-body test)."""

from __future__ import annotations

import pytest

from serve.admission import MAX_RETRY_AFTER_S, Admission
from serve.errors import ApiError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def shed(admission: Admission) -> ApiError:
    with pytest.raises(ApiError) as caught, admission.slot():
        pass
    return caught.value


def test_admits_up_to_the_limit_then_sheds_with_503_and_retry_after() -> None:
    admission = Admission(limit=2, retry_after_s=1.0, clock=Clock())
    with admission.slot(), admission.slot():
        error = shed(admission)
        assert (error.status, error.code, error.headers) == (503, "overloaded", {"Retry-After": "1"})
        assert admission.inflight == 2  # the shed request took no slot
    assert admission.inflight == 0
    with admission.slot():  # the slots are free again
        pass


def test_a_failing_request_gives_its_slot_back() -> None:
    admission = Admission(limit=1, retry_after_s=1.0, clock=Clock())
    with pytest.raises(ValueError), admission.slot():
        raise ValueError("bad image")
    assert admission.inflight == 0


def test_retry_after_follows_the_recent_time_in_the_slot_within_floor_and_ceiling() -> None:
    clock = Clock()
    admission = Admission(limit=1, retry_after_s=1.0, clock=clock)

    def serve_one(seconds: float) -> None:
        with admission.slot():
            clock.now += seconds

    serve_one(4.2)  # admitted requests take ~4 s: a shed client should come back after that, not after 1 s
    with admission.slot():
        assert shed(admission).headers == {"Retry-After": "5"}
    clock.now += 3600.0  # an idle hour does not count as slowness
    for _ in range(40):
        serve_one(0.01)  # fast again: down to the floor
    with admission.slot():
        assert shed(admission).headers == {"Retry-After": "1"}
    for _ in range(40):
        serve_one(500.0)  # never more than the ceiling
    with admission.slot():
        assert shed(admission).headers == {"Retry-After": str(int(MAX_RETRY_AFTER_S))}


def test_the_gate_sheds_model_routes_before_the_app_and_lets_health_checks_through() -> None:
    """AdmissionGate over a Starlette app whose /v1/caption waits until released (in-process ASGI)."""
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from serve.admission import AdmissionGate

    release, calls = asyncio.Event(), []

    async def caption(request):
        calls.append(request.url.path)
        await release.wait()
        return JSONResponse({"caption": "ok"})

    async def healthz(request):
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/caption", caption, methods=["POST"]), Route("/healthz", healthz)])
    app.add_middleware(AdmissionGate, routes=("/v1/caption",))
    app.state.admission = Admission(limit=1, retry_after_s=2.0, clock=Clock())

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            admitted = asyncio.create_task(client.post("/v1/caption"))
            while not calls:  # the first request holds the only slot
                await asyncio.sleep(0.01)
            shed_now = await client.post("/v1/caption")
            health = await client.get("/healthz")
            release.set()
            return await admitted, shed_now, health

    admitted, shed_now, health = asyncio.run(scenario())
    assert admitted.status_code == 200 and health.status_code == 200
    assert shed_now.status_code == 503 and shed_now.headers["retry-after"] == "2"
    assert shed_now.json()["error"] == "overloaded"
    assert calls == ["/v1/caption"]  # the shed request never reached the app
    assert app.state.admission.inflight == 0
