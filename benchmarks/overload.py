"""Overload: bursts of 600 and 900 simultaneous requests, queues as they were vs as serve/config.yaml sizes them.

    python -m benchmarks.overload [--bursts 600 900] [--peak-requests 128]

The same untrained seed-config model (K=16, D=256, 64x64, 32 new tokens a request) as benchmarks.serve_load,
on a local Ray over loopback, one encoder replica. Two configurations:

  before  the old sizing: ingress 256 ongoing + 512 queued, model halves 64 + 256, one decoder replica,
          no admission limit (every request waits its turn, however long the queue);
  after   serve/config.yaml as shipped: ingress admits max_inflight_requests (64) and answers the rest
          503 + Retry-After at once; model halves 32 + 64; two decoder replicas.

For each: the peak (32 clients in a closed loop), then each burst fired at once. Printed per run: answered
200 / 503 / other, served req/s over the burst, p50/p99 latency of the 200s and p99 of the 503s.
"""

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_load import MAX_NEW_TOKENS, load, machine, random_pngs, seed_checkpoint, wait_ready

OLD_SIZING = {
    "Ingress": {"max_ongoing_requests": 256, "max_queued_requests": 512},
    "PlanEncoder": {"max_ongoing_requests": 64, "max_queued_requests": 256},
    "PlanDecoder": {"max_ongoing_requests": 64, "max_queued_requests": 256, "num_replicas": 1},
}


@dataclass
class Burst:
    name: str
    size: int
    seconds: float
    latencies: dict[int, list[float]]  # status (0: no answer within the client timeout) -> seconds

    def count(self, status: int) -> int:
        return len(self.latencies.get(status, []))

    def pct(self, status: int, q: float) -> float:
        """The q-th percentile latency of the answers with this status, in ms."""
        values = self.latencies.get(status, [])
        return float(np.percentile(values, q)) * 1e3 if values else float("nan")

    def row(self) -> str:
        counts = {k: len(v) for k, v in sorted(self.latencies.items()) if k not in (200, 503)}
        other = f"{sum(counts.values())} {counts}" if counts else "0"  # e.g. 408: the proxy's request timeout
        return (
            f"| {self.name} | {self.size} | {self.count(200)} | {self.count(503)} | {other} | "
            f"{self.count(200) / self.seconds:.1f} | {self.pct(200, 50):.1f} | {self.pct(200, 99):.1f} | "
            f"{self.pct(503, 99):.1f} |"
        )


async def burst(url: str, images: list[bytes], name: str, size: int, timeout_s: float) -> Burst:
    """`size` requests sent at once, each on its own connection."""
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    latencies: dict[int, list[float]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    "/v1/caption",
                    content=images[i % len(images)],
                    params={"max_new_tokens": MAX_NEW_TOKENS},
                    headers={"Content-Type": "image/png"},
                )
                status = r.status_code
            except httpx.HTTPError:
                status = 0  # no answer within the client timeout
            latencies.setdefault(status, []).append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(size)))
        seconds = time.perf_counter() - start
    return Burst(name, size, seconds, latencies)


def app_args(path: Path, old: bool) -> dict:
    from serve.app import shipped_config

    args = shipped_config(model=str(path)).app_args
    for name, options in args["deployment_options"].items():
        options["ray_actor_options"].pop("resources", None)  # one node plays every role
        if old:
            options.update(OLD_SIZING[name])
    encoder = args["deployment_options"]["PlanEncoder"]
    encoder.pop("autoscaling_config", None)
    encoder["num_replicas"] = 1  # the same compute in both runs: 2 cores cannot feed more replicas anyway
    if old:
        args["max_inflight_requests"] = 10**6  # no admission limit, as before
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, nargs="+", default=[600, 900])
    parser.add_argument("--peak-requests", type=int, default=128, help="closed-loop requests for the peak")
    parser.add_argument("--timeout", type=float, default=180.0, help="client timeout per request, seconds")
    args = parser.parse_args(argv)

    os.environ.pop("RAY_ADDRESS", None)  # loopback only: never a remote cluster
    import ray
    from ray import serve

    from serve.app import build_app, shipped_config

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = shipped_config(model="unused").http_options | {"host": "127.0.0.1", "port": port}
    serve.start(http_options=http)
    url = f"http://127.0.0.1:{port}"
    images = random_pngs(16)
    path = seed_checkpoint(Path(tempfile.mkdtemp(prefix="overload-")))
    header = (
        "| config | burst | 200 | 503 | other | served req/s | p50 200 ms | p99 200 ms | p99 503 ms |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows: list[str] = []
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for name, old in (("before", True), ("after", False)):
            serve.run(build_app(app_args(path, old)), name="overload", route_prefix="/")
            wait_ready(url)
            peak = asyncio.run(
                load(url, images, name=f"{name}: peak", requests=args.peak_requests, concurrency=32, max_s=120)
            )
            rows.append(
                f"| {name} | 32 clients, closed loop | {peak.requests - peak.errors} | - | {peak.errors} | "
                f"{peak.throughput:.1f} | {peak.pct(50):.1f} | {peak.pct(99):.1f} | - |"
            )
            print(rows[-1], flush=True)
            for size in args.bursts:
                result = asyncio.run(burst(url, images, name, size, args.timeout))
                rows.append(result.row())
                print(rows[-1], flush=True)
                time.sleep(2.0)  # let the queues drain between bursts
            serve.delete("overload")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{header}\n" + "\n".join(rows))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
