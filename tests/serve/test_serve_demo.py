"""The README demo's serving step, `python -m serve.demo`, run the way `make demo` runs it.

Its own process and its own local Ray instance (the demo starts one on purpose), a model registered in a
real sqlite MLflow store and named by models:/ URI in LAST_RUN.json, and the held-out image captioned over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.codec import HEADER_SIZE, plan_nbytes
from model.generation import caption_images
from model.tokenizer import ByteTokenizer
from model.transform import ImageTransform
from serve.app import shipped_config
from tests.serve.conftest import ServeFixtures, free_port, register_in_mlflow

ROOT = Path(__file__).resolve().parents[2]


def full_length_caption(path: Path, image: bytes) -> str:
    """In-process reference at the model's own length limit (the demo sets no max_new_tokens)."""
    loaded = load_model(path)
    cfg = loaded.config.model
    x = ImageTransform(cfg.image_size)(image).unsqueeze(0)  # (1, 3, S, S)
    tokenizer = ByteTokenizer(cfg.max_seq_length)
    return caption_images(loaded.model, x, tokenizer, max_new_tokens=cfg.max_seq_length - 1)[0]


def run_demo(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, not the tests' one
    return subprocess.run(
        [sys.executable, "-m", "serve.demo", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=480
    )


@pytest.mark.ray  # its own local Ray in the demo's process
@pytest.mark.slow
def test_serve_demo_captions_the_held_out_image_over_http(
    serve_fixtures: ServeFixtures, tmp_path: Path, mlflow_store
) -> None:
    model_path = serve_fixtures.model.path
    tracking_uri, model_uri = register_in_mlflow(tmp_path / "mlflow", model_path, "demo-captioner", mlflow_store)
    image = tmp_path / "held_out.png"
    image.write_bytes(serve_fixtures.images["blue"])
    run_file = tmp_path / "LAST_RUN.json"
    run_file.write_text(
        json.dumps({"model_uri": model_uri, "tracking_uri": tracking_uri, "held_out_image": str(image)})
    )
    port = free_port()

    proc = run_demo(["--run", str(run_file), "--port", str(port)])

    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    lines = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if ":" in line
    }
    with torch.inference_mode():
        expected = full_length_caption(serve_fixtures.model.path, image.read_bytes())
    assert lines["caption"] == expected
    cfg = serve_fixtures.model.config.model
    assert lines["plan size"].startswith(f"{HEADER_SIZE + plan_nbytes(cfg.plan_len, cfg.embed_dim, 'fp16')} bytes")
    assert lines["model"].startswith("demo-captioner v1 (") and serve_fixtures.model.fingerprint in lines["model"]
    assert f"http://127.0.0.1:{port}/v1/caption" in proc.stdout  # the curl lines name the address it served on
    # One configuration everywhere: the running proxy (asked by the demo) has serve/config.yaml's request
    # timeout; a demo that started Serve without it would print "none" here.
    timeout_s = shipped_config().http_options["request_timeout_s"]
    assert lines["proxy timeout"] == f"{timeout_s:g} s (config: {timeout_s:g} s)", lines["proxy timeout"]
    # What a person sees by default: a short transcript; Ray's and Serve's own lines go to the printed log file.
    assert len((proc.stdout + proc.stderr).splitlines()) < 40, proc.stdout + proc.stderr
    assert "INFO" not in proc.stdout + proc.stderr
    # It ends cleanly: serve.shutdown() on the way out made Ray print
    # "(raylet) Task ServeController.graceful_shutdown failed ..." as the transcript's last line.
    assert "graceful_shutdown" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1].startswith("to keep it running:"), proc.stdout[-500:]
    log_file = next((tmp_path / "logs").glob("serve-demo-*.log"))
    assert f"log: {log_file}" in proc.stdout and "is ready at" in log_file.read_text()


def test_serve_demo_without_a_training_run_says_what_to_do(tmp_path: Path) -> None:
    proc = run_demo(["--run", str(tmp_path / "missing.json")])
    assert proc.returncode == 2
    assert "run `python -m jobs.demo` first" in proc.stderr


def test_demo_declares_the_node_roles_but_not_rays_own_node_resources() -> None:
    """The local Ray plays every role, with room for every replica; `node:...` resources are Ray's own."""
    from serve.demo import local_resources

    args = shipped_config().app_args
    # The Ingress (HTTP + encoder) autoscales to 4 replicas on encoder nodes; 2 decoder replicas.
    assert local_resources(args) == {"encoder_node": 4.0, "decoder_node": 2.0}
    ingress = args["deployment_options"]["Ingress"]["ray_actor_options"]
    ingress["resources"] = {**ingress["resources"], "node:__internal_head__": 0.001}  # a head pin, as Ray's actors
    assert local_resources(args) == {"encoder_node": 4.0, "decoder_node": 2.0}
