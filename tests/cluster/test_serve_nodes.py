"""Serve across nodes: the Ingress (HTTP + encoder) on an encoder node, decoders on decoder nodes, plans crossing.

Placement comes from serve/config.yaml (`ray_actor_options.resources`), so these tests check the shipped
config; only replica counts change per test. Losing a node is a raylet killed without a drain. The waits
are polls on what the clients saw, not fixed sleeps.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from model.codec import HEADER_SIZE, plan_nbytes
from tests.cluster.conftest import LocalCluster, actor_nodes, wait_resources
from tests.serve.conftest import COLOURS, MAX_NEW_TOKENS, free_port, in_process_captions, square_png, train_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow]
APP = "captioner"


def config_deployments() -> dict[str, dict[str, Any]]:
    """The `deployments:` entries of serve/config.yaml, by name."""
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Any]:
    images = {name: square_png(rgb) for name, rgb in COLOURS.items()}
    trained = train_tiny(images, seed=0, steps=150, out=tmp_path_factory.mktemp("cluster-model"))
    expected = in_process_captions(trained.path, images)
    assert len(set(expected.values())) == len(images), f"tiny model did not learn distinct captions: {expected}"
    return {"trained": trained, "images": images, "expected": expected}


@pytest.fixture(scope="module")
def url(local_cluster: LocalCluster) -> str:
    from ray import serve

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})  # as serve/config.yaml
    return f"http://127.0.0.1:{port}"


def deploy(model: dict[str, Any], url: str, *, decoders: int) -> None:
    """The captioner with serve/config.yaml's placement, one Ingress (HTTP + encoder) and `decoders` decoders."""
    from ray import serve

    from serve.app import build_app

    shipped = config_deployments()
    options = {
        name: {
            "ray_actor_options": shipped[name]["ray_actor_options"],
            "num_replicas": n,
            # Replace a missing replica fast: the controller probes every second (the shipped default is 10 s).
            "health_check_period_s": 1,
            "health_check_timeout_s": 5,
        }
        for name, n in (("Ingress", 1), ("PlanDecoder", decoders))
    }
    # A request waiting for a replacement replica must not hit the 20 s stage timeout (504) on a busy 2-core
    # machine: the tests check which statuses come back; the time to recovery is measured and printed.
    args = {
        "model": str(model["trained"].path),
        "torch_threads": 1,
        "request_timeout_s": 60,
        "deployment_options": options,
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the captioner did not come up on the cluster")


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` every 0.1 s until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def caption(client: httpx.Client, url: str, image: bytes) -> httpx.Response:
    return client.post(
        f"{url}/v1/caption",
        content=image,
        params={"max_new_tokens": MAX_NEW_TOKENS},
        headers={"Content-Type": "image/png"},
    )


def jpeg_bytes(png: bytes, size: int, quality: int) -> int:
    """What shipping the model-sized input as JPEG would cost instead of the plan."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize((size, size), Image.BICUBIC).save(buf, "JPEG", quality=quality)
    return len(buf.getvalue())


def test_placement_in_config_names_the_node_roles():
    shipped = config_deployments()
    assert shipped["Ingress"]["ray_actor_options"]["resources"] == {"encoder_node": 1}  # HTTP + encoder
    assert shipped["PlanDecoder"]["ray_actor_options"]["resources"] == {"decoder_node": 1}


def test_encoder_and_decoder_on_their_nodes_give_single_node_captions(local_cluster, model, url, capsys):
    from ray import serve

    deploy(model, url, decoders=1)
    try:
        encoders, decoders = actor_nodes("Ingress"), actor_nodes("PlanDecoder")
        assert len(encoders) == 1 and set(encoders) <= local_cluster.node_ids("encoder")
        assert len(decoders) == 1 and set(decoders) <= local_cluster.node_ids("decoder")
        assert encoders[0] != decoders[0]  # the plan really crosses between two raylets

        cfg = model["trained"].config.model
        plan_size = HEADER_SIZE + plan_nbytes(cfg.plan_len, cfg.embed_dim, "fp16")
        with httpx.Client(timeout=60) as client:
            for name, image in model["images"].items():
                r = caption(client, url, image)
                assert r.status_code == 200, r.text
                assert r.json()["caption"] == model["expected"][name]  # what the model gives in one process
                assert r.json()["plan_bytes"] == plan_size
            encoded = client.post(
                f"{url}/v1/encode", content=model["images"]["red"], headers={"Content-Type": "image/png"}
            )
            assert encoded.status_code == 200 and len(encoded.content) == plan_size  # the bytes that cross

        patches = cfg.num_patches * cfg.embed_dim * 2  # (N, D) fp16: shipping the encoder's activations instead
        jpeg = {q: jpeg_bytes(model["images"]["red"], cfg.image_size, q) for q in (75, 95)}
        with capsys.disabled():
            print(
                f"\n[cluster] encoder->decoder per request: {plan_size} B plan (fp16, K={cfg.plan_len}, "
                f"D={cfg.embed_dim})"
                f" vs {patches} B patch activations (N={cfg.num_patches}), JPEG {cfg.image_size}px q75 {jpeg[75]} B,"
                f" q95 {jpeg[95]} B"
            )
    finally:
        serve.delete(APP)


class Load:
    """Closed-loop clients on a background thread, recording (time, status, Retry-After) of every response."""

    def __init__(self, url: str, images: list[bytes], clients: int = 3) -> None:
        self.url, self.images, self.clients = url, images, clients
        self.records: list[tuple[float, int, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=90) as client:
            n = 0
            while not self.stop.is_set():
                try:
                    r = caption(client, self.url, self.images[(i + n) % len(self.images)])
                    self.records.append((time.monotonic(), r.status_code, r.headers.get("retry-after")))
                except httpx.HTTPError:
                    self.records.append((time.monotonic(), -1, None))
                n += 1

    def successes(self, after: float = 0.0) -> int:
        return sum(1 for t, status, _ in list(self.records) if status == 200 and t > after)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def test_losing_the_decoder_node_gives_503_then_a_replica_elsewhere(local_cluster, model, url, capsys):
    from ray import serve

    deploy(model, url, decoders=1)
    try:
        (before,) = actor_nodes("PlanDecoder")
        victim = next(n for n in local_cluster.nodes["decoder"] if n.node_id == before)
        assert set(actor_nodes("Ingress")) <= local_cluster.node_ids("encoder")  # it outlives the decoder node
        with Load(url, list(model["images"].values())) as load:
            wait_for(lambda: load.successes() >= 3, "captions before the node loss")
            killed = time.monotonic()
            local_cluster.remove(victim)
            recovered = None
            deadline = killed + 120
            while recovered is None and time.monotonic() < deadline:
                time.sleep(0.2)
                # Recovered: a success from a request sent after the node was gone (3 clients, so any 200 a few
                # seconds later came from the new replica).
                late = [t for t, status, _ in load.records if status == 200 and t > killed + 1.0]
                if late and actor_nodes("PlanDecoder"):
                    recovered = late[0]
        assert recovered is not None, Counter(s for _, s, _ in load.records)
        after = actor_nodes("PlanDecoder")
        assert len(after) == 1 and after[0] != before and after[0] in local_cluster.node_ids("decoder")
        failures = [(status, retry) for t, status, retry in load.records if status != 200]
        assert all(status == 503 and retry and int(retry) >= 1 for status, retry in failures), failures
        with capsys.disabled():
            print(
                f"\n[cluster] decoder node lost: {recovered - killed:.1f} s to the first caption from the new replica; "
                f"{len(failures)} request(s) answered 503 + Retry-After, {len(load.records) - len(failures)} 200"
            )
    finally:
        serve.delete(APP)
        local_cluster.add("decoder")


def test_with_two_decoder_replicas_a_node_loss_costs_no_request(local_cluster, model, url, capsys):
    from ray import serve

    deploy(model, url, decoders=2)
    try:
        nodes = actor_nodes("PlanDecoder")
        assert len(set(nodes)) == 2 and set(nodes) == local_cluster.node_ids("decoder")
        victim = local_cluster.nodes["decoder"][0]
        with Load(url, list(model["images"].values())) as load:
            wait_for(lambda: load.successes() >= 3, "captions before the node loss")
            killed = time.monotonic()
            local_cluster.remove(victim)
            # Past the ~3 s in which the node is dead but not yet declared so (3 missed 1 s health checks),
            # with captions answered after that: the survivor carried the load through and beyond the loss.
            wait_for(lambda: load.successes(after=killed + 4.0) >= 3, "captions after the node loss")
        statuses = Counter(status for _, status, _ in load.records)
        after = sum(1 for t, status, _ in load.records if t > killed and status == 200)
        with capsys.disabled():
            print(f"\n[cluster] two decoder replicas, one node lost: responses {dict(statuses)}")
        assert set(statuses) == {200}, statuses
        assert after >= 3  # requests kept flowing through the surviving replica
    finally:
        serve.delete(APP)
        local_cluster.add("decoder")
        wait_resources(local_cluster.total(), available=True, timeout_s=60)
