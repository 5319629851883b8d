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


# ---------------------------------------------------------------------------
# Serve's proxy (serve/proxy_gate.py): the middlewares exactly as Serve's proxy applies them, in process.


def _proxy_app(monkeypatch: pytest.MonkeyPatch, limit: int, answer):
    """Serve's own middleware stacking (_apply_middlewares) over `answer`, the proxy's handler stand-in."""
    from ray.serve._private.http_util import _apply_middlewares

    from serve import proxy_gate

    for key, value in proxy_gate.proxy_env(limit, 2.0).items():
        monkeypatch.setenv(key, value)
    return _apply_middlewares(answer, proxy_gate.middlewares())


def test_the_proxys_own_plain_text_errors_become_the_json_error_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60's proxy answers backpressure, an unavailable deployment and its timeout in text/plain."""
    import asyncio

    import httpx
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.http_util import get_http_response_status, send_http_response_on_exception
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    failures = {
        "/full": BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=3),
        "/gone": DeploymentUnavailableError(DeploymentID(name="Ingress", app_name="captioner")),
        "/slow": TimeoutError(),
    }

    async def proxy(scope, receive, send) -> None:
        if scope["path"] in failures:  # what Serve's proxy sends when the handle call raises (proxy.py)
            status = get_http_response_status(failures[scope["path"]], 60.0, "req-1")
            for message in send_http_response_on_exception(status, response_started=False):
                await send(message)
            return
        media = b"text/plain" if scope["path"] == "/-/healthz" else b"text/html"  # success: left as it is
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", media)]})
        await send({"type": "http.response.body", "body": b"success"})

    app = _proxy_app(monkeypatch, 0, proxy)

    async def get_all() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            return {path: await client.get(path) for path in [*failures, "/-/healthz", "/"]}

    answers = asyncio.run(get_all())
    expected = {"/full": (503, "overloaded", "3"), "/gone": (503, "unavailable", "2"), "/slow": (408, "timeout", None)}
    for path, (status, code, retry) in expected.items():
        r = answers[path]
        assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), (path, r.headers)
        body = r.json()
        assert set(body) == {"error", "detail"} and body["error"] == code and body["detail"], (path, body)
        assert r.headers.get("retry-after") == retry, (path, r.headers)
        assert "x-request-id" in r.headers  # Serve's own headers survive
    assert "backpressure" in answers["/full"].json()["detail"] and "timed out" in answers["/slow"].json()["detail"]
    assert (answers["/-/healthz"].text, answers["/"].text) == ("success", "success")
    assert answers["/-/healthz"].headers["content-type"] == "text/plain"


def test_the_proxy_sheds_model_routes_before_any_handle_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond the limit, a model request gets the JSON 503 from the proxy itself; GETs are never shed."""
    import asyncio

    import httpx

    release, calls = asyncio.Event(), []

    async def proxy(scope, receive, send) -> None:  # stands in for the handle call to the ingress
        calls.append((scope["method"], scope["path"]))
        if scope["path"].startswith(("/shipped/v1", "/v1")):  # model work: busy until released
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    app = _proxy_app(monkeypatch, 2, proxy)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            held = [asyncio.create_task(client.post(f"/shipped/v1/{r}")) for r in ("caption", "decode")]
            while len(calls) < 2:  # both slots taken
                await asyncio.sleep(0.01)
            now = [await client.post("/v1/encode"), await client.get("/healthz"), await client.post("/other")]
            release.set()
            return [*now, *(await asyncio.gather(*held)), await client.post("/v1/caption")]

    shed_now, health, other, *admitted = asyncio.run(scenario())
    assert shed_now.status_code == 503 and shed_now.headers["retry-after"] == "2", shed_now.headers
    assert shed_now.json()["error"] == "overloaded" and "at the proxy" in shed_now.json()["detail"]
    assert health.status_code == other.status_code == 200  # not a model route: never shed
    assert [r.status_code for r in admitted] == [200, 200, 200]  # slots given back
    assert ("POST", "/v1/encode") not in calls  # the shed request never reached the handle call


def test_serve_config_installs_the_proxy_gate_with_the_ingress_limit() -> None:
    """serve/config.yaml's proxy environment: the gate's callback, the ingress's limit and Retry-After floor."""
    from serve import proxy_gate
    from serve.app import shipped_config

    config = shipped_config(model="unused")
    env = config.controller_options["runtime_env"]["env_vars"]
    args = config.app_args
    # The proxy then admits exactly what one ingress replica admits: with one proxy, the ingress never sheds.
    assert env == proxy_gate.proxy_env(args["max_inflight_requests"], args["retry_after_s"]), env
    ingress, decoder = (args["deployment_options"][name] for name in ("Ingress", "PlanDecoder"))
    # Admitted work never waits in Serve's router (it backs off up to 0.5 s a retry): the ingress (HTTP +
    # encoder) and the decoders take it all.
    assert ingress["max_ongoing_requests"] >= args["max_inflight_requests"], ingress
    assert decoder["max_ongoing_requests"] * decoder["num_replicas"] >= args["max_inflight_requests"], decoder
