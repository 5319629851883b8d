"""serve/config.yaml as Serve reads it, deployed the way `serve run serve/config.yaml` does.

The module deploys the shipped config once, changed only where a test needs it: the model comes from
a models:/NAME@ALIAS URI in a real MLflow sqlite store, the decoder runs 2 replicas, an API key is set,
and the encoder's queue is tiny so overload is easy to provoke.
"""

from __future__ import annotations

import copy
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
    assert set(deployments) == {"Ingress", "PlanEncoder", "PlanDecoder"}
    for name in ("PlanEncoder", "PlanDecoder"):
        assert deployments[name].max_queued_requests > 0, f"{name} queue must be bounded"
        assert set(deployments[name].user_config) == {"max_batch_size", "batch_wait_timeout_s"}


def test_bad_args_are_rejected_at_build_time() -> None:
    with pytest.raises(ValueError, match="unknown_option"):
        build_app({"model": "x.safetensors", "unknown_option": 1})
    with pytest.raises(ValueError, match="max_body_bytes"):
        build_app({"model": "x.safetensors", "max_body_bytes": 0})


@pytest.fixture(scope="module")
def deployed(serve_url: str, serve_fixtures: ServeFixtures, tmp_path_factory: pytest.TempPathFactory):
    tracking_uri, model_uri = register_in_mlflow(
        tmp_path_factory.mktemp("mlflow"), serve_fixtures.model.path, MODEL_NAME
    )
    config = copy.deepcopy(shipped_config())
    app = config["applications"][0]
    app["args"].update(
        model=model_uri,
        mlflow_tracking_uri=tracking_uri,
        api_key=API_KEY,
        default_max_new_tokens=MAX_NEW_TOKENS,
    )
    deployments = {d["name"]: d for d in app["deployments"]}
    for d in deployments.values():
        d["ray_actor_options"]["num_cpus"] = 0.1 if d["name"] == "Ingress" else 0.25
        d["ray_actor_options"].pop("resources", None)  # one node plays every role (tests/cluster/ places them)
    deployments["PlanDecoder"]["num_replicas"] = 2
    encoder = deployments["PlanEncoder"]
    encoder.pop("autoscaling_config")
    # One request at a time, one more queued, each held ~0.3 s by the batch wait: overload is certain.
    encoder.update(num_replicas=1, max_ongoing_requests=1, max_queued_requests=1)
    encoder["user_config"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.3}

    # What `serve run serve/config.yaml` does once Serve is up: hand the whole config to the controller.
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    try:
        wait_running(app["name"])
        wait_healthy(serve_url)
        yield {"url": serve_url, "app": app["name"], "model_uri": model_uri}
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
    assert app.deployments["PlanEncoder"].replica_states.get("RUNNING") == 1


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


def test_overload_gets_503_with_retry_after_then_recovers(client: httpx.Client, serve_fixtures: ServeFixtures) -> None:
    image = serve_fixtures.images["green"]

    def call(_: int) -> httpx.Response:
        return client.post("/v1/caption", content=image, headers=AUTH)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, f"12 concurrent requests against a 1+1 queue were all accepted: {statuses}"
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"] == "overloaded"
    for r in responses:
        if r.status_code == 200:
            assert r.json()["caption"] == serve_fixtures.expected["green"]
    r = call(0)
    assert r.status_code == 200, r.text
