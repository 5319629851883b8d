"""Overload: bursts of 600 and 900 simultaneous requests, queues as they were vs as serve/config.yaml sizes them.

    python -m benchmarks.overload [--bursts 600 900] [--peak-requests 128] [--configs before after]

The same untrained seed-config model (K=16, D=256, 64x64, 32 new tokens a request) as benchmarks.serve_load,
on a local Ray over loopback, one ingress replica (HTTP + encoder, as serve/config.yaml ships it). Configurations:

  before  the old sizing: ingress 256 ongoing + 512 queued, decoder 64 + 256, one decoder replica,
          no admission limit (every request waits its turn, however long the queue);
  ingress serve/config.yaml without the proxy gate: admission in the ingress only;
  after   serve/config.yaml as shipped: the proxy and the ingress admit max_inflight_requests (64) and answer
          the rest 503 + Retry-After at once; decoder 32 + 64; two decoder replicas.

For each: the peak (32 clients in a closed loop), then each burst fired at once, each request on its own
connection, with GET /healthz probed every 100 ms alongside. Printed per run: answered 200 / 503 (and how
many of those were JSON with Retry-After) / other, the served rate (200s per second until the last 200),
p50/p99 latency of the 200s and of the 503s, the slowest /healthz, the burst's length, and the client's own
CPU time (it shares the machine with the server). The client writes HTTP/1.1 by hand: httpx, used before,
spent ~10 of a 12 s burst's CPU seconds itself.
"""

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.serve_load import MAX_NEW_TOKENS, machine, random_pngs, seed_checkpoint, wait_ready

# The old queue sizing of the deployments that still exist (the separate PlanEncoder deployment is gone: the
# Ingress now holds the encoder, see serve/ingress.py).
OLD_SIZING = {
    "Ingress": {"max_ongoing_requests": 256, "max_queued_requests": 512},
    "PlanDecoder": {"max_ongoing_requests": 64, "max_queued_requests": 256, "num_replicas": 1},
}


CONFIGS = {
    "before": "the old sizing, no admission limit anywhere",
    "ingress": "serve/config.yaml without the proxy gate: admission in the Ingress only",
    "after": "serve/config.yaml as shipped: the proxy gate (serve/proxy_gate.py) and the Ingress's",
}


@dataclass
class Answer:
    status: int  # 0: no answer (connection error or the client timeout)
    seconds: float
    json_body: bool  # Content-Type application/json
    retry_after: str | None
    timings_ms: dict[str, float] | None = None  # a 200's own {"encode", "decode", "total"} from the ingress


@dataclass
class Burst:
    name: str
    size: int
    seconds: float
    answers: list[Answer]
    client_cpu_s: float  # this process's CPU time over the burst: the client shares the machine
    healthz_ms: list[float]  # GET /healthz latencies, probed every 100 ms while the burst ran
    server_cpu_s: dict[str, float]  # CPU seconds per server process kind over the burst (proxy, Ingress, ...)

    def of(self, status: int) -> list[Answer]:
        return [a for a in self.answers if a.status == status]

    def pct(self, status: int, q: float) -> float:
        """The q-th percentile latency of the answers with this status, in ms."""
        values = [a.seconds for a in self.of(status)]
        return float(np.percentile(values, q)) * 1e3 if values else float("nan")

    def served_rate(self) -> float:
        """200s per second from the burst's start to its last 200 (the admitted work's throughput)."""
        done = [a.seconds for a in self.of(200)]
        return len(done) / max(done) if done else 0.0

    def where(self) -> str:
        """Where the 200s spent their time (median / max ms): before the ingress route ran, encode, decode."""
        served = [a for a in self.of(200) if a.timings_ms]
        if not served:
            return "no 200s"
        stages = {
            "proxy+queue": [a.seconds * 1e3 - a.timings_ms["total"] for a in served],
            "encode": [a.timings_ms["encode"] for a in served],
            "decode": [a.timings_ms["decode"] for a in served],
            "answered at": [a.seconds * 1e3 for a in served],
        }
        return "; ".join(f"{k} {np.median(v):.0f}/{max(v):.0f}" for k, v in stages.items())

    def row(self) -> str:
        counts = {}
        for a in self.answers:
            if a.status not in (200, 503):
                counts[a.status] = counts.get(a.status, 0) + 1
        other = f"{sum(counts.values())} {counts}" if counts else "0"  # e.g. 408: the proxy's request timeout
        shed = self.of(503)
        shaped = sum(a.json_body and a.retry_after is not None for a in shed)
        health = f"{max(self.healthz_ms):.0f}" if self.healthz_ms else "-"
        return (
            f"| {self.name} | {self.size} | {len(self.of(200))} | {len(shed)} ({shaped} JSON + Retry-After) | "
            f"{other} | {self.served_rate():.1f} | {self.pct(200, 50):.0f} | {self.pct(200, 99):.0f} | "
            f"{self.pct(503, 50):.0f} | {self.pct(503, 99):.0f} | {health} | {self.seconds:.1f} | "
            f"{self.client_cpu_s:.1f} | {' '.join(f'{k} {v:.1f}' for k, v in sorted(self.server_cpu_s.items()))} |"
        )


async def http_request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on its own connection, written by hand: (status, lower-cased headers, body).

    httpx spent ~17 ms of CPU a request with 600 connections open (10 s of a 12 s burst on 2 cores), so
    the old figures measured the client more than the server; this costs well under a millisecond.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        fields = {"Host": f"127.0.0.1:{port}", "Content-Type": "image/png"} | (headers or {})
        fields |= {"Content-Length": str(len(body)), "Connection": "close"}
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        answer: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            answer[key.strip().lower()] = value.strip()
        return status, answer, await reader.read()  # Connection: close, so the body ends at EOF
    finally:
        writer.close()


async def burst(port: int, images: list[bytes], name: str, size: int, timeout_s: float) -> Burst:
    """`size` caption requests sent at once, each on its own connection, with a /healthz probe alongside."""
    path = f"/v1/caption?max_new_tokens={MAX_NEW_TOKENS}"
    answers: list[Answer] = []
    healthz_ms: list[float] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        try:
            status, headers, body = await asyncio.wait_for(
                http_request(port, "POST", path, images[i % len(images)]), timeout_s
            )
        except (OSError, TimeoutError, IndexError, ValueError):
            status, headers, body = 0, {}, b""
        json_body = headers.get("content-type", "").startswith("application/json")
        timings = json.loads(body)["timings_ms"] if status == 200 else None
        answers.append(Answer(status, time.perf_counter() - start, json_body, headers.get("retry-after"), timings))

    async def probe(done: asyncio.Event) -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            with contextlib.suppress(OSError, TimeoutError, IndexError, ValueError):
                if (await asyncio.wait_for(http_request(port, "GET", "/healthz"), timeout_s))[0] == 200:
                    healthz_ms.append((time.perf_counter() - t0) * 1e3)
            await asyncio.sleep(0.1)

    cpu0, server0 = sum(os.times()[:2]), server_cpu()
    done = asyncio.Event()
    prober = asyncio.create_task(probe(done))
    await asyncio.gather(*(one(i) for i in range(size)))
    seconds = time.perf_counter() - start
    done.set()
    await prober
    client_s = sum(os.times()[:2]) - cpu0
    server = {k: v - server0.get(k, 0.0) for k, v in server_cpu().items()}
    return Burst(name, size, seconds, answers, client_s, healthz_ms, server)


def server_cpu() -> dict[str, float]:
    """CPU seconds so far of this Ray instance's Serve processes, by kind (proxy, Ingress, PlanDecoder, ...).

    Only descendants of this process count (the local Ray it started), not other Ray instances on the machine.
    """
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu, names = {}, {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            parent[int(pid)] = int(fields[1])
            cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            names[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    me, totals = os.getpid(), {}
    for pid, name in names.items():
        kind = name.rpartition(":")[2] if "ServeReplica" in name else None  # ray::ServeReplica:app:Ingress
        kind = "proxy" if name.startswith("ray::ProxyActor") else kind
        ancestor = parent.get(pid)
        while ancestor not in (None, 0, 1, me):
            ancestor = parent.get(ancestor)
        if kind and ancestor == me:
            totals[kind] = totals.get(kind, 0.0) + cpu[pid]
    return totals


def app_args(path: Path, old: bool) -> dict:
    from serve.app import shipped_config

    args = shipped_config(model=str(path)).app_args
    for name, options in args["deployment_options"].items():
        options["ray_actor_options"].pop("resources", None)  # one node plays every role
        if old:
            options.update(OLD_SIZING[name])
    ingress = args["deployment_options"]["Ingress"]  # HTTP + encoder
    ingress.pop("autoscaling_config", None)
    ingress["num_replicas"] = 1  # the same compute in both runs: 2 cores cannot feed more replicas anyway
    if old:
        args["max_inflight_requests"] = 10**6  # no admission limit, as before
    return args


async def closed_loop(port: int, images: list[bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    """The peak: `clients` in a closed loop until `requests` are answered; (200s per second, 200 latencies s)."""
    path = f"/v1/caption?max_new_tokens={MAX_NEW_TOKENS}"
    latencies: list[float] = []
    sent = 0

    async def client() -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            t0 = time.perf_counter()
            status, _, _ = await http_request(port, "POST", path, images[sent % len(images)])
            if status == 200:
                latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies) / (time.perf_counter() - start), latencies


HEADER = (
    "| config | load | 200 | 503 | other | served req/s | p50 200 ms | p99 200 ms | p50 503 ms | p99 503 ms | "
    "max /healthz ms | burst s | client CPU s | server CPU s |\n" + "|---" * 14 + "|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, nargs="+", default=[600, 900])
    parser.add_argument("--peak-requests", type=int, default=128, help="closed-loop requests for the peak")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--timeout", type=float, default=180.0, help="client timeout per request, seconds")
    args = parser.parse_args(argv)

    os.environ.pop("RAY_ADDRESS", None)  # loopback only: never a remote cluster
    import ray
    from ray import serve

    from jobs.runtime import ensure_ray
    from serve.app import build_app, shipped_config

    ensure_ray(num_cpus=4, log_to_driver=False)  # RAY_ADDRESS popped above: a fresh loopback instance
    shipped = shipped_config(model="unused")
    images = random_pngs(16)
    path = seed_checkpoint(Path(tempfile.mkdtemp(prefix="overload-")))
    rows: list[str] = []
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for name in args.configs:
            # Serve restarts per configuration: the proxy gate is set when the controller (and proxy) start.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            controller = shipped.controller_options if name == "after" else None
            serve.start(http_options=shipped.http_options | {"port": port}, controller_options=controller)
            url = f"http://127.0.0.1:{port}"
            serve.run(build_app(app_args(path, name == "before")), name="overload", route_prefix="/")
            wait_ready(url)
            rate, latencies = asyncio.run(closed_loop(port, images, 32, args.peak_requests))
            p50, p99 = (float(np.percentile(latencies, q)) * 1e3 for q in (50, 99))
            rows.append(
                f"| {name} | 32 clients, closed loop (peak) | {len(latencies)} | - | "
                f"{args.peak_requests - len(latencies)} | {rate:.1f} | {p50:.0f} | {p99:.0f} | - | - | - | - | - | - |"
            )
            print(rows[-1], flush=True)
            for size in args.bursts:
                result = asyncio.run(burst(port, images, name, size, args.timeout))
                rows.append(result.row())
                print(rows[-1], f"\n  200s, median/max ms: {result.where()}", flush=True)
                time.sleep(2.0)  # let the queues drain between bursts
            serve.shutdown()
    finally:
        ray.shutdown()  # Serve goes with the local instance
    print(f"\n{HEADER}\n" + "\n".join(rows))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
