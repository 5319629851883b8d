"""Load test of the Serve application over loopback HTTP: throughput and p50/p95/p99 latency.

    python -m benchmarks.serve_load [--requests 192] [--max-seconds 60] [--concurrency 32] [--nodes 1 2] [--no-write]

Two comparisons, run in one go on an untrained seed-config model (16.9M parameters, K=16, D=256, 64x64;
random weights decode the full token budget every time, which is the worst case for latency):

  (a) batching on (serve/config.yaml's max_batch_size) vs off (max_batch_size 1) for both halves,
      32 concurrent clients;
  (b) the hop: the split app exactly as serve/config.yaml ships it (HTTP -> ingress, which encodes the
      image in its own replica -> plan bytes by one handle call -> decoder) vs one deployment doing
      image -> caption in-process with the same batching, 1 client: the same Ingress with the decoder
      half in its own process (the hop and nothing else differs), and beside it a minimal FastAPI route
      around the model (no admission, auth or body checks). The applications run side by side and the
      requests alternate between them (ABBA order), so drift in the machine's load falls on all alike.

Both run on one Ray node (playing the encoder and the decoder role), then again across two nodes: a head
(the HeadOnly proxy, the single deployment) plus an encoder node (the ingress + encoder) and a decoder node,
each its own raylet and object store (`ray.cluster_utils.Cluster`), placed by serve/config.yaml's node-role
resources.
Every scenario is bounded by a request count and a wall-clock cap, and talks to 127.0.0.1 only.
The figures replace benchmarks/RESULTS.md's section named in SECTION.
"""

# No `from __future__ import annotations`: FastAPI must see real parameter types through Serve's ingress rewrite.
import argparse
import asyncio
import io
import os
import platform
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, Request
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Serving: batching and the encoder -> decoder hop, one node and two (issue 14)"
DATE = "2026-11-30"
MAX_NEW_TOKENS = 32


@dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    stages_ms: dict[str, list[float]] | None = None  # the ingress's timings_ms per request (split path only)

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def stage(self, name: str) -> float:
        return float(np.median(self.stages_ms[name])) if self.stages_ms and self.stages_ms.get(name) else float("nan")

    def row(self) -> str:
        return (
            f"| {self.name} | {self.requests} | {self.errors} | {self.throughput:.1f} | "
            f"{self.pct(50):.1f} | {self.pct(95):.1f} | {self.pct(99):.1f} |"
        )


async def load(url: str, images: list[bytes], *, name: str, requests: int, concurrency: int, max_s: float) -> Result:
    """`concurrency` clients in a closed loop until `requests` are sent or `max_s` passes."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + max_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                image = images[sent % len(images)]
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/caption",
                    content=image,
                    params={"max_new_tokens": MAX_NEW_TOKENS},
                    headers={"Content-Type": "image/png"},
                )
                if r.status_code == 200:
                    latencies.append((time.perf_counter() - t0) * 1e3)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return Result(name, sent, errors, seconds, latencies)


def paired_latency(url: str, images: list[bytes], paths: dict[str, str], requests: int) -> list[Result]:
    """One client, sequential requests alternating between the routes in ABBA order; one Result per route."""
    names = list(paths)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    errors = dict.fromkeys(names, 0)
    busy = dict.fromkeys(names, 0.0)
    stages: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(requests):
            for name in names if i % 2 == 0 else reversed(names):
                t0 = time.perf_counter()
                r = client.post(
                    paths[name],
                    content=images[i % len(images)],
                    params={"max_new_tokens": MAX_NEW_TOKENS},
                    headers={"Content-Type": "image/png"},
                )
                elapsed = time.perf_counter() - t0
                busy[name] += elapsed
                if r.status_code == 200:
                    latencies[name].append(elapsed * 1e3)
                    for stage, ms in r.json().get("timings_ms", {}).items():
                        stages[name].setdefault(stage, []).append(ms)
                else:
                    errors[name] += 1
    return [Result(name, requests, errors[name], busy[name], latencies[name], stages[name]) for name in names]


def compute_ms(path: Path, images: list[bytes], reps: int = 20) -> dict[str, float]:
    """p50 of each model stage run in this process at batch 1 (one torch thread, as the replicas run it).

    What the hop adds is the rest: a stage's call as the ingress times it minus its compute here.
    """
    import torch

    from model.checkpoint import load_model
    from model.codec import decode_plan, encode_plan
    from model.generation import generate
    from model.transform import ImageTransform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load_model(str(path))
    transform = ImageTransform(loaded.config.model.image_size)
    times: dict[str, list[float]] = {"encode": [], "decode": []}
    try:
        with torch.inference_mode():
            for i in range(reps):
                t0 = time.perf_counter()
                plan = loaded.model.encoder(transform(images[i % len(images)])[None])  # (1, K, D)
                wire = encode_plan(plan[0], fingerprint=loaded.fingerprint)
                t1 = time.perf_counter()
                plan = decode_plan(wire, expect_fingerprint=loaded.fingerprint)[None]  # (1, K, D)
                generate(loaded.model.decoder, plan, max_new_tokens=MAX_NEW_TOKENS)
                t2 = time.perf_counter()
                times["encode"].append((t1 - t0) * 1e3)
                times["decode"].append((t2 - t1) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {stage: float(np.median(ms[reps // 4 :])) for stage, ms in times.items()}


def random_pngs(n: int, size: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def seed_checkpoint(folder: Path) -> Path:
    import torch

    from model.checkpoint import CHECKPOINT_FILE, save_model
    from model.config import load_config
    from model.model import build_model

    cfg = load_config("seed_run2")
    torch.manual_seed(0)
    path = folder / CHECKPOINT_FILE
    save_model(path, build_model(cfg.model), cfg)
    return path


def fused_deployment():
    """One deployment doing image -> plan -> bytes -> plan -> caption in-process: the no-split baseline.

    It batches like the shipped encoder (the Ingress's user_config: a lone request waits out the same timer
    once), the batch run inline on the replica's loop as the decoder's is.
    """
    from ray import serve

    app = FastAPI()

    @serve.deployment(name="Fused", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
    @serve.ingress(app)
    class Fused:
        def __init__(self, path: str, user_config: dict[str, Any]) -> None:
            import torch

            from model.checkpoint import load_model
            from model.tokenizer import ByteTokenizer
            from model.transform import ImageTransform

            torch.set_num_threads(1)
            loaded = load_model(path)
            self.model, self.fingerprint = loaded.model, loaded.fingerprint
            self.transform = ImageTransform(loaded.config.model.image_size)
            self.tokenizer = ByteTokenizer(loaded.config.model.max_seq_length)
            self.run_batch.set_max_batch_size(user_config["max_batch_size"])
            self.run_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

        @app.post("/v1/caption")
        async def caption(self, request: Request, max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
            pixels = await asyncio.to_thread(self.transform, await request.body())
            return {"caption": await self.run_batch((pixels, max_new_tokens))}

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
        async def run_batch(self, items: list) -> list[str]:
            return self.work(items)

        def work(self, items: list) -> list[str]:
            import torch

            from model.codec import decode_plan, encode_plan
            from model.generation import generate

            with torch.inference_mode():
                plans = self.model.encoder(torch.stack([p for p, _ in items]))  # (B, K, D)
                wire = [encode_plan(p, fingerprint=self.fingerprint) for p in plans]  # the same codec work
                plans = torch.stack([decode_plan(w, expect_fingerprint=self.fingerprint) for w in wire])
                tokens = generate(self.model.decoder, plans, max_new_tokens=max(n for _, n in items))
            return self.tokenizer.decode_batch(tokens)

    return Fused


def single_ingress(path: Path):
    """The shipped Ingress as ONE deployment: the decoder half in its own process instead of by handle call.

    Same HTTP front (admission, auth, body checks, error mapping), same encoder in threads, and the decoder's
    batch run inline on the replica's loop as in PlanDecoder, with serve/config.yaml's args and batching:
    image -> caption in-process. The split app differs from it by the decoder hop and nothing else.
    """
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    from serve import stages
    from serve.app import AppArgs, replica_args, shipped_config
    from serve.deployments import PlanDecoder
    from serve.ingress import Ingress

    args = shipped_config(model=str(path)).app_args
    options = args["deployment_options"]
    decoder_args, settings, encoder = replica_args(AppArgs.model_validate(args))  # what build_app binds
    decoder_batching = dict(options["PlanDecoder"]["user_config"])

    class Single(Ingress.func_or_class):
        async def __init__(self, decoder_args: dict[str, Any], settings: dict[str, Any], encoder: dict[str, Any]):
            self.local = PlanDecoder.func_or_class(**decoder_args)
            unused = DeploymentHandle("PlanDecoder", app_name="unused")  # never called: _decode is local
            await super().__init__(unused, settings, encoder)

        def reconfigure(self, user_config: dict[str, Any]) -> None:
            super().reconfigure(user_config)  # the encoder's batching, as the split app's Ingress
            self.local.reconfigure(decoder_batching)  # the decoder's, as the split app's PlanDecoder

        async def _decode(self, plan: bytes, max_new_tokens: int, temperature: float) -> str:
            return stages.checked(await self.local.decode(plan, max_new_tokens, temperature))

        async def _model_info(self) -> dict[str, Any]:
            if self._model is None:
                local = {"decoder_fingerprint": self.local.fingerprint, "max_new_tokens": self.local.max_new_tokens}
                self._model = {**self.encoder.info(), **local}
            return self._model

    ingress = {k: v for k, v in options["Ingress"].items() if k != "autoscaling_config"}
    ingress["ray_actor_options"] = {"num_cpus": 1}  # anywhere: the head in the 2-node topology
    return serve.deployment(Single, name="Single", num_replicas=1, **ingress).bind(decoder_args, settings, encoder)


def split_app(path: Path, batch: int | None = None):
    """The shipped app: serve/config.yaml's args and deployment options, the model at `path`.

    `batch` replaces max_batch_size (1 = batching off; the wait stays the shipped one). One replica per model
    half keeps the batching comparison about batching (the config lets the ingress + encoder autoscale, and
    ships two decoders for failover).
    """
    from serve.app import build_app, shipped_config

    args = shipped_config(model=str(path)).app_args
    for name in ("Ingress", "PlanDecoder"):  # Ingress: HTTP + encoder
        options = args["deployment_options"][name]
        options.pop("autoscaling_config", None)
        options["num_replicas"] = 1
        if batch is not None:
            options["user_config"] = {**options["user_config"], "max_batch_size": batch}
    return build_app(args)


def shipped_batching() -> dict[str, Any]:
    """The Ingress's (the encoder's) user_config in serve/config.yaml (max_batch_size, batch_wait_timeout_s).

    The minimal route's one batch starts at the image, as the encoder's does, so it takes the encoder's wait.
    """
    from serve.app import shipped_config

    return dict(shipped_config().app_args["deployment_options"]["Ingress"]["user_config"])


@contextmanager
def topology(nodes: int):
    """Ray on one node that plays both roles, or a head plus an encoder node and a decoder node (own raylets)."""
    import ray

    from jobs.runtime import ensure_ray

    roles = {"encoder_node": 1, "decoder_node": 1}
    if nodes == 1:
        ensure_ray(num_cpus=4, resources=roles, log_to_driver=False)
        try:
            yield "1 node"
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        for role in roles:
            cluster.add_node(num_cpus=1, resources={role: 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield "2 nodes"
    finally:
        ray.shutdown()
        cluster.shutdown()


def wait_ready(url: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    image = random_pngs(1)[0]
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{url}/v1/caption", content=image, params={"max_new_tokens": 2}, timeout=30)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready in {timeout_s}s")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} CPU cores ({cpu}), {system}, Python {platform.python_version()}"


def write_section(text: str, section: str = SECTION) -> None:
    """Replace (or append) one benchmark's own section of RESULTS.md, leaving the others untouched."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(section)
    if start == -1:
        new = old.rstrip() + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(section))
        new = old[:start] + text.rstrip() + "\n\n" + (old[end + 1 :] if end != -1 else "")
    RESULTS.write_text(new.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=192, help="requests per throughput scenario")
    parser.add_argument(
        "--latency-requests", type=int, default=60, help="sequential requests per route, the routes alternating"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="wall-clock cap per scenario")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    parser.add_argument(
        "--nodes", type=int, nargs="+", choices=(1, 2), default=[1, 2], help="one node, two nodes, or both in turn"
    )
    args = parser.parse_args(argv)

    os.environ.pop("RAY_ADDRESS", None)  # loopback only: never a remote cluster
    load_before = os.getloadavg()[0]
    images = random_pngs(16)
    path = seed_checkpoint(Path(tempfile.mkdtemp(prefix="serve-load-")))
    header = "| scenario | requests | errors | req/s | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|---|"
    print(header)
    results: list[Result] = []
    summary: list[str] = []
    compute = compute_ms(path, images)
    breakdown = [
        "| topology | proxy + HTTP (client p50 - ingress) | ingress own | encode (in the ingress) | its overhead | "
        "decoder call | its overhead | single deployment: all overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for nodes in args.nodes:
        with topology(nodes) as where:
            on, off, (split_lat, single_lat, bare_lat) = scenarios(args, where, path, images, results)
        speedup = on.throughput / off.throughput
        added = split_lat.pct(50) - single_lat.pct(50)
        enc, dec, ingress = (split_lat.stage(s) for s in ("encode", "decode", "total"))
        breakdown.append(
            f"| {where} | {split_lat.pct(50) - ingress:.1f} | {ingress - enc - dec:.1f} | {enc:.1f} | "
            f"{enc - compute['encode']:.1f} | {dec:.1f} | {dec - compute['decode']:.1f} | "
            f"{single_lat.pct(50) - compute['encode'] - compute['decode']:.1f} |"
        )
        summary.append(
            f"- {where}: single deployment p50 {single_lat.pct(50):.1f} ms, split p50 {split_lat.pct(50):.1f} ms, "
            f"hop **{added:+.1f} ms** (target <= 3 ms; against the minimal single deployment, p50 "
            f"{bare_lat.pct(50):.1f} ms: {split_lat.pct(50) - bare_lat.pct(50):+.1f} ms); batching speed-up at "
            f"{args.concurrency} clients **{speedup:.2f}x** ({on.throughput:.1f} vs {off.throughput:.1f} req/s; "
            "target >= 3x)"
        )
    load_after = os.getloadavg()[0]
    table = "\n".join([header, *(r.row() for r in results)])
    compute_line = (
        f"In-process compute at batch 1 (this process, one torch thread): encode {compute['encode']:.1f} ms "
        f"(image decode, encoder, plan to bytes), decode {compute['decode']:.1f} ms (bytes to plan, "
        f"{MAX_NEW_TOKENS} tokens). Where the split path's time goes (p50 ms, the ingress's timings_ms of the "
        "1-client requests; a stage's overhead is its time minus the compute; the decoder call's is the hop):"
    )
    print("\n" + "\n".join(summary) + "\n\n" + compute_line + "\n" + "\n".join(breakdown))
    text = (
        f"{SECTION}\n\n"
        f"Command: `python -m benchmarks.serve_load` (requests {args.requests} per throughput scenario, "
        f"{args.latency_requests} per route in the paired latency scenario, cap {args.max_seconds:g} s each)  \n"
        f"Machine: 2-core CPU VM, 24 GiB, no GPU ({machine()})  \nDate: {DATE}  \n"
        f"1-minute load average before/after: {load_before:.1f} / {load_after:.1f} (figures from a busy machine are "
        "not comparable with a quiet one; rerun on an idle machine for the targets)\n\n"
        f"Untrained seed-config model (D=256, K=16, 64x64), {MAX_NEW_TOKENS} new tokens per request (random weights "
        f"never emit EOS, so every request decodes the full budget), plan fp16 ({16 * 256 * 2 + 18} bytes); one CPU "
        "and one torch thread per model replica; client, proxy and replicas share the machine over loopback. "
        '"2 nodes": the ingress + encoder and the decoder on their own raylets (encoder_node / decoder_node, as '
        "serve/config.yaml places them), the proxy on the head, the plan crossing from one node to the other "
        "by one handle call over Serve's gRPC transport.\n\n"
        f"{table}\n\n" + "\n".join(summary) + "\n\n" + compute_line + "\n\n" + "\n".join(breakdown) + "\n"
    )
    if not args.no_write:
        write_section(text)
        print(f"\nwrote {SECTION!r} in {RESULTS}")
    return 0


def scenarios(
    args: argparse.Namespace, where: str, path: Path, images: list[bytes], results: list[Result]
) -> tuple[Result, Result, list[Result]]:
    """Batching on/off at N clients and the paired split-vs-single latency, on the Ray this process is joined to."""
    from ray import serve

    from serve.app import shipped_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # serve/config.yaml's proxy placement and the proxies' gate (controller_options), on a free loopback port
    shipped = shipped_config()
    serve.start(
        proxy_location=shipped.proxy_location,
        http_options={"host": "127.0.0.1", "port": port},
        controller_options=shipped.controller_options,
    )
    url = f"http://127.0.0.1:{port}"

    def run(name: str, concurrency: int, requests: int) -> Result:
        asyncio.run(load(url, images, name=name, requests=4, concurrency=min(4, concurrency), max_s=60))  # warm-up
        result = asyncio.run(
            load(url, images, name=name, requests=requests, concurrency=concurrency, max_s=args.max_seconds)
        )
        print(result.row(), flush=True)
        results.append(result)
        return result

    c = args.concurrency
    batching = shipped_batching()
    try:
        serve.run(split_app(path), name="bench", route_prefix="/")
        wait_ready(url)
        on = run(f"{where}: split, batching on ({batching['max_batch_size']}), {c} clients", c, args.requests)
        # The hop, as shipped: the split app and one deployment with the same batching, one client, ABBA order.
        serve.run(single_ingress(path), name="single", route_prefix="/single")
        serve.run(fused_deployment().bind(str(path), batching), name="fused", route_prefix="/fused")
        wait_ready(f"{url}/single")
        wait_ready(f"{url}/fused")
        routes = {
            f"{where}: split, as shipped, 1 client": "/v1/caption",
            f"{where}: single deployment (the same Ingress, decoder in-process), 1 client": "/single/v1/caption",
            f"{where}: minimal single deployment (bare FastAPI route), 1 client": "/fused/v1/caption",
        }
        paired_latency(url, images, routes, 4)  # warm-up
        latency = paired_latency(url, images, routes, args.latency_requests)
        for result in latency:
            print(result.row(), flush=True)
            results.append(result)
        serve.delete("fused")
        serve.delete("single")
        serve.run(split_app(path, batch=1), name="bench", route_prefix="/")  # user_config only: reconfigure()
        wait_ready(url)
        off = run(f"{where}: split, batching off, {c} clients", c, args.requests)
    finally:
        serve.shutdown()
    return on, off, latency


if __name__ == "__main__":
    sys.exit(main())
