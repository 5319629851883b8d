"""Fixtures for the serve tests: two tiny trained checkpoints, test images, Serve on a free loopback port.

The models are trained in-process (no Ray) for a few hundred steps on coloured squares, so each image
gets its own caption and "same caption as in-process" is a meaningful check, not "" == "".
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from PIL import Image

from model.checkpoint import load_model, save_model
from model.config import Config, load_config
from model.generation import caption_images
from model.model import build_model
from model.tokenizer import PAD, ByteTokenizer
from model.transform import ImageTransform

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
MAX_NEW_TOKENS = 24  # the captions are ~14 bytes; a short limit keeps every request fast


@dataclass
class TrainedModel:
    path: Path
    fingerprint: str
    config: Config


@dataclass
class ServeFixtures:
    model: TrainedModel  # the one being served
    other: TrainedModel  # same shape, different weights (different seed)
    images: dict[str, bytes]  # colour -> PNG bytes
    expected: dict[str, str]  # colour -> caption computed in-process


def square_png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    """A coloured square on grey, as PNG bytes."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    img.paste(Image.new("RGB", (size // 2, size // 2), colour), (size // 4, size // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def train_tiny(images: dict[str, bytes], seed: int, steps: int, out: Path) -> TrainedModel:
    """Teacher-forced cross-entropy on one caption per image; returns the saved checkpoint."""
    cfg = load_config("debug", {"train.seed": str(seed)})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    transform = ImageTransform(cfg.model.image_size)
    tokenizer = ByteTokenizer(cfg.model.max_seq_length)
    x = torch.stack([transform(data) for data in images.values()])  # (B, 3, S, S)
    ids, _ = tokenizer.batch([f"a {colour} square" for colour in images])  # (B, T)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread, and the CPU is shared
    for _ in range(steps):
        logits = model(x, ids).logits  # (B, T, V); logits[:, t] predicts ids[:, t + 1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    path = out / f"seed{seed}" / "model.safetensors"
    fingerprint = save_model(path, model, cfg)
    return TrainedModel(path=path, fingerprint=fingerprint, config=cfg)


def in_process_captions(path: Path, images: dict[str, bytes]) -> dict[str, str]:
    """The reference: the checkpoint loaded whole, captioning through the shared transform."""
    loaded = load_model(path)
    transform = ImageTransform(loaded.config.model.image_size)
    x = torch.stack([transform(data) for data in images.values()])
    tokenizer = ByteTokenizer(loaded.config.model.max_seq_length)
    captions = caption_images(loaded.model, x, tokenizer, max_new_tokens=MAX_NEW_TOKENS)
    return dict(zip(images, captions, strict=True))


@pytest.fixture(scope="session")
def serve_fixtures(tmp_path_factory: pytest.TempPathFactory) -> ServeFixtures:
    out = tmp_path_factory.mktemp("serve-models")
    images = {name: square_png(rgb) for name, rgb in COLOURS.items()}
    model = train_tiny(images, seed=0, steps=150, out=out)
    other = train_tiny(images, seed=1, steps=20, out=out)
    expected = in_process_captions(model.path, images)
    assert len(set(expected.values())) == len(images), f"tiny model did not learn distinct captions: {expected}"
    return ServeFixtures(model=model, other=other, images=images, expected=expected)


def register_in_mlflow(tmp: Path, checkpoint: Path, name: str, store: Callable[[Path], str]) -> tuple[str, str]:
    """Log the checkpoint to a sqlite-backed MLflow (made by the `mlflow_store` fixture) and register it;
    returns (tracking URI, models:/ URI)."""
    uri = store(tmp / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("serve-test", artifact_location=(tmp / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(checkpoint), artifact_path="checkpoint")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    return uri, f"models:/{name}@champion"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_local) -> str:
    """Serve started once per session, HTTP on a free loopback port, the proxy gate as serve/config.yaml sets it."""
    from ray import serve

    from serve.app import shipped_config

    port = free_port()
    controller = shipped_config(model="unused").controller_options  # serve/proxy_gate.py in the proxy
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller)
    return f"http://127.0.0.1:{port}"


def wait_running(app: str, timeout_s: float = 300.0) -> None:
    """Wait for every replica of `app`; the machine may be busy, so the limit is generous."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AssertionError(f"application {app} failed to deploy: {status.message}")
        time.sleep(0.5)
    raise AssertionError(f"application {app} not running after {timeout_s}s: {status}")


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    """Poll /healthz until the proxy routes to the freshly deployed ingress."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"{url}/healthz not healthy after {timeout_s}s: {last}")


# Small replicas: the whole serve suite shares 4 logical CPUs on 2 cores with nothing else running.
SMALL = {
    "Ingress": {"ray_actor_options": {"num_cpus": 0.25}},  # HTTP + encoder
    "PlanDecoder": {"ray_actor_options": {"num_cpus": 0.25}},
}
SHARED_APP = "captioner-test"
BODY_TIMEOUT_S = 2.0  # the shared app's body-read deadline: short, so the slow-body test stays short


def shipped_test_args(model: str, **overrides: object) -> dict:
    """serve/config.yaml's app args and deployments, changed only where a one-node test run must differ.

    CPUs shrink (the suite shares 8 logical CPUs on 2 cores), node-role resources go (one node plays every
    role) and the Ingress (HTTP + encoder) has one fixed replica instead of autoscaling. Everything else
    (queues, limits, timeouts, two decoder replicas) is what `serve run serve/config.yaml` deploys.
    """
    from serve.app import shipped_config

    args = shipped_config(model=model, default_max_new_tokens=MAX_NEW_TOKENS, **overrides).app_args
    for name, options in args["deployment_options"].items():
        options["ray_actor_options"] = dict(SMALL[name]["ray_actor_options"])
    ingress = args["deployment_options"]["Ingress"]
    ingress.pop("autoscaling_config", None)
    ingress["num_replicas"] = 1
    return args


@pytest.fixture(scope="session")
def app_url(serve_url: str, serve_fixtures: ServeFixtures):
    """The shipped configuration serving the tiny model at `/`, shared by every test that needs no special app."""
    from ray import serve

    from serve.app import build_app

    args = shipped_test_args(str(serve_fixtures.model.path), body_timeout_s=BODY_TIMEOUT_S)
    try:
        serve.run(build_app(args), name=SHARED_APP, route_prefix="/", blocking=False)
        wait_running(SHARED_APP)
        wait_healthy(serve_url)
        yield serve_url
    finally:
        from ray.serve.exceptions import RayServeException

        # tests/cluster (run last) has disconnected from this Ray instance and its Serve by now.
        with contextlib.suppress(RayServeException):
            serve.delete(SHARED_APP)


# ---------------------------------------------------------------------------
# A real headless Chromium for the web page (Debian's chromium + chromedriver, installed by `make browser`)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # browser screenshots (git-ignored)
WAIT_S = 60  # the shared machine may be busy; a caption normally takes well under a second


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        message = "needs Debian's chromium and chromium-driver: run `make browser`"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them through `make test`: missing there is a broken setup
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(arg)
    options.add_argument("--window-size=1200,1150")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def page_wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, message=f"page never showed {what}")


def page_caption(driver) -> str | bool:
    """The caption text once a request has finished (the element's class leaves 'busy')."""
    element = driver.find_element("id", "caption")
    return element.text if element.get_attribute("class") == "caption" else False
