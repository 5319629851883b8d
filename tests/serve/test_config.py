"""serve/config.yaml as Serve reads it, deployed the way `serve run serve/config.yaml` does.

The module deploys the shipped config once, changed only where a test needs it: the model comes from
a models:/NAME@ALIAS URI in a real MLflow sqlite store, an API key is set, the ingress admits only 16
requests at once and the encoder holds each batch 0.3 s, so overload is easy to provoke. It is served under
/shipped, so it never collides with the session's shared application at /.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from serve.app import AppArgs, build_app
from tests.serve.conftest import MAX_NEW_TOKENS, ServeFixtures, register_in_mlflow, wait_healthy, wait_running

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"
MODEL_NAME = "tiny-captioner"
API_KEY = "test-key-0123"
PREFIX = "/shipped"
MAX_INFLIGHT = 16


def shipped_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_parses_into_serve_schema_and_builds() -> None:
    schema = ServeDeploySchema.model_validate(shipped_config())
    assert schema.http_options.host == "127.0.0.1"  # safe by default: loopback only
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    assert app.args["model"].startswith("models:/")
    AppArgs.model_validate(app.args)  # every arg is known and in range
    assert build_app(app.args) is not None
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "PlanDecoder"}  # Ingress: HTTP + encoder
    for name, deployment in deployments.items():  # every queue bounded: excess load is answered, not parked
        assert deployment.max_queued_requests > 0, f"{name} queue must be bounded"
    for name in ("Ingress", "PlanDecoder"):  # the encoder's batching and the decoder's
        assert set(deployments[name].user_config) == {"max_batch_size", "batch_wait_timeout_s"}


def test_bad_args_are_rejected_at_build_time() -> None:
    with pytest.raises(ValueError, match="unknown_option"):
        build_app({"model": "x.safetensors", "unknown_option": 1})
    with pytest.raises(ValueError, match="max_body_bytes"):
        build_app({"model": "x.safetensors", "max_body_bytes": 0})


@pytest.fixture(scope="module")
def deployed(serve_url: str, serve_fixtures: ServeFixtures, tmp_path_factory: pytest.TempPathFactory, mlflow_store):
    tracking_uri, model_uri = register_in_mlflow(
        tmp_path_factory.mktemp("mlflow"), serve_fixtures.model.path, MODEL_NAME, mlflow_store
    )
    config = copy.deepcopy(shipped_config())
    app = config["applications"][0]
    app["route_prefix"] = PREFIX
    app["args"].update(
        model=model_uri,
        mlflow_tracking_uri=tracking_uri,
        api_key=API_KEY,
        default_max_new_tokens=MAX_NEW_TOKENS,
        max_inflight_requests=MAX_INFLIGHT,
    )
    deployments = {d["name"]: d for d in app["deployments"]}
    for d in deployments.values():
        d["ray_actor_options"]["num_cpus"] = 0.25
        d["ray_actor_options"].pop("resources", None)  # one node plays every role (tests/cluster/ places them)
    assert deployments["PlanDecoder"]["num_replicas"] == 2  # shipped: a killed replica leaves one serving
    encoder = deployments["Ingress"]  # HTTP + encoder
    encoder.pop("autoscaling_config")
    encoder["num_replicas"] = 1
    # Batches of 4 held ~0.3 s each by the batch wait: 16 admitted requests keep the service busy for ~1 s.
    encoder["user_config"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.3}

    # What `serve run serve/config.yaml` does once Serve is up: hand the whole config to the controller.
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    try:
        wait_running(app["name"])
        wait_healthy(serve_url + PREFIX)
        yield {"url": serve_url + PREFIX, "app": app["name"], "model_uri": model_uri}
    finally:
        serve.delete(app["name"])


@pytest.fixture(scope="module")
def client(deployed):
    with httpx.Client(base_url=deployed["url"], timeout=60) as c:
        yield c


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_replica_counts_from_the_config_are_honoured(deployed) -> None:
    app = serve.status().applications[deployed["app"]]
    assert app.deployments["PlanDecoder"].replica_states.get("RUNNING") == 2
    assert app.deployments["Ingress"].replica_states.get("RUNNING") == 1


def test_model_served_from_a_models_uri(client: httpx.Client, serve_fixtures: ServeFixtures, deployed) -> None:
    info = client.get("/v1/model", headers=AUTH).json()
    assert info["source"] == deployed["model_uri"]
    assert (info["name"], info["version"]) == (MODEL_NAME, "1")
    assert info["fingerprint"] == serve_fixtures.model.fingerprint
    r = client.post("/v1/caption", content=serve_fixtures.images["red"], headers=AUTH | {"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == serve_fixtures.expected["red"]


def test_api_key_is_required_on_v1_routes(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    image = serve_fixtures.images["blue"]
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"}):
        for r in (client.post("/v1/caption", content=image, headers=headers), client.get("/v1/model", headers=headers)):
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200  # liveness stays open for load balancers
    r = client.post("/v1/caption", content=image, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == serve_fixtures.expected["blue"]


@pytest.mark.ray
@pytest.mark.slow
def test_the_web_page_asks_for_the_api_key_then_captions(
    browser, deployed, serve_fixtures: ServeFixtures, tmp_path: Path
) -> None:
    """The page under a route prefix, on an app with a key: the key field appears, a wrong key is refused."""
    from tests.serve.conftest import ARTIFACTS, page_caption, page_wait

    browser.get(deployed["url"] + "/")
    page_wait(browser, lambda d: d.find_element("id", "keybox").is_displayed(), "the API key field")
    key = browser.find_element("id", "api-key")
    key.send_keys("wrong-key")
    browser.find_element("id", "save-key").click()
    page_wait(browser, lambda d: "refused" in d.find_element("id", "key-message").text, "the wrong key refused")
    key.clear()
    key.send_keys(API_KEY)
    browser.find_element("id", "save-key").click()
    page_wait(browser, lambda d: d.find_element("id", "model-badge").text == f"{MODEL_NAME} v1", "the model badge")
    assert not browser.find_element("id", "keybox").is_displayed()
    image = tmp_path / "red.png"
    image.write_bytes(serve_fixtures.images["red"])
    browser.find_element("id", "file-input").send_keys(str(image))
    assert page_wait(browser, page_caption, "a caption") == serve_fixtures.expected["red"]
    browser.save_screenshot(str(ARTIFACTS / "web_page_api_key.png"))


def test_overload_is_shed_fast_with_json_503_and_retry_after(
    deployed, client: httpx.Client, serve_fixtures: ServeFixtures
) -> None:
    """200 concurrent requests against 16 admission slots: the excess gets a JSON 503 + Retry-After at once
    (not queued behind model work), the admitted ones succeed, /healthz keeps answering meanwhile."""
    from benchmarks.overload import http_request

    port = int(deployed["url"].rsplit(":", 1)[1].split("/", 1)[0])
    image = serve_fixtures.images["green"]

    async def burst(n: int) -> tuple[list[tuple[int, dict, bytes, float]], list[tuple[int, float]]]:
        start = time.perf_counter()
        health: list[tuple[int, float]] = []

        async def one() -> tuple[int, dict, bytes, float]:
            answer = await http_request(port, "POST", f"{PREFIX}/v1/caption", image, AUTH)
            return (*answer, time.perf_counter() - start)

        async def probe() -> None:  # /healthz every 50 ms while the burst is in progress
            while len(health) < 1000:
                status, _, _ = await http_request(port, "GET", f"{PREFIX}/healthz")
                health.append((status, time.perf_counter() - start))
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        answers = await asyncio.gather(*(one() for _ in range(n)))
        prober.cancel()
        return answers, health

    answers, health = asyncio.run(burst(200))
    statuses = Counter(status for status, *_ in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 50, f"200 concurrent requests against {MAX_INFLIGHT} slots were mostly queued: {statuses}"
    assert statuses[200] >= MAX_INFLIGHT, statuses  # the admitted ones are served, not dropped
    for status, headers, body, _ in answers:
        if status == 503:
            assert headers["content-type"].startswith("application/json"), headers
            error = httpx.Response(status, content=body).json()
            assert error["error"] == "overloaded" and int(headers["retry-after"]) >= 1, (error, headers)
        else:
            assert httpx.Response(status, content=body).json()["caption"] == serve_fixtures.expected["green"]
    shed = sorted(t for status, *_, t in answers if status == 503)
    served = sorted(t for status, *_, t in answers if status == 200)
    # Shed at once, not queued behind model work: most 503s come before the admitted work is done. (The first
    # 503 racing the first 200 is not asserted: a fresh-clone run saw 373 ms vs 318 ms, the burst's own start-up.)
    assert shed[len(shed) // 2] < served[-1], (shed[0], shed[len(shed) // 2], served)
    # Health checks bypass admission: answered 200 while the admitted requests were still being served.
    assert [t for status, t in health if status == 200 and t < served[-1]], health
    assert all(status == 200 for status, _ in health), health
    print(
        f"burst of 200: {dict(statuses)}; median 503 at {shed[len(shed) // 2] * 1e3:.0f} ms, first/last 200 at "
        f"{served[0] * 1e3:.0f}/{served[-1] * 1e3:.0f} ms; {len(health)} /healthz probes all 200"
    )
    r = client.post("/v1/caption", content=image, headers=AUTH)  # and it keeps serving
    assert r.status_code == 200, r.text


def _decoder_replicas(app: str) -> list[dict]:
    import ray

    return [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "PlanDecoder" in actor["name"] and f"{app}#" in actor["name"]
    ]


def test_decoder_replica_killed_mid_stream_answers_200_or_json_503(
    deployed, client: httpx.Client, serve_fixtures: ServeFixtures
) -> None:
    """A killed decoder replica gave in-flight requests a text/plain 500; now they are retried once or get a 503."""
    import ray

    victims = _decoder_replicas(deployed["app"])
    assert len(victims) == 2, victims
    image = serve_fixtures.images["yellow"]
    results: list[tuple[float, httpx.Response]] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            r = client.post("/v1/caption", content=image, headers=AUTH, params={"temperature": 0})
            results.append((time.monotonic(), r))

    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(worker)
        started = time.monotonic()
        while len(results) < 6 and time.monotonic() - started < 60:
            time.sleep(0.05)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
        recovered_at = None
        while time.monotonic() - killed_at < 120:
            names = {a["name"] for a in _decoder_replicas(deployed["app"])}
            running = serve.status().applications[deployed["app"]].deployments["PlanDecoder"].replica_states
            if victims[0]["name"] not in names and len(names) == 2 and running.get("RUNNING") == 2:
                recovered_at = time.monotonic()
                break
            time.sleep(0.1)
        time.sleep(1.0)  # a little load on the replaced replica too
        stop.set()
    assert recovered_at is not None, "Serve did not replace the killed decoder replica within 120 s"
    statuses = Counter(r.status_code for _, r in results)
    after = [t for t, r in results if t > killed_at and r.status_code == 200]
    gap = (after[0] - killed_at) if after else float("inf")
    print(
        f"decoder replica killed under load: {dict(statuses)} over {len(results)} requests; "
        f"first 200 after the kill at +{gap:.2f} s; 2 replicas RUNNING again after {recovered_at - killed_at:.1f} s"
    )
    assert set(statuses) <= {200, 503}, statuses
    for _, r in results:
        if r.status_code == 503:
            assert r.json()["error"] in ("unavailable", "overloaded") and int(r.headers["retry-after"]) >= 1, r.text
        else:
            assert r.json()["caption"] == serve_fixtures.expected["yellow"]
    assert after, "no request succeeded after the kill"
