"""Everything a GPU machine should be measured on, in one command of a few minutes.

    python -m benchmarks.gpu [--preset seed_run2] [--steps 20] [--warmup 5] [--no-write]

1. Training throughput at the preset (the log's seed config by default), batch 32: fp32, bf16 autocast, and
   bf16 autocast with `torch.compile`; samples/s and MFU (benchmarks.train's FLOP count and peak table).
2. DDP on every visible GPU (NCCL, one process per GPU, batch 32 per GPU): samples/s for the whole group and
   the scaling against one GPU.
3. Serving on the GPU, the two halves the Serve deployments run: image batch -> plans -> wire bytes -> plans ->
   greedy captions (untrained weights decode the whole token budget: the worst case). p50/p95 latency of one
   request alone and captions/s at batch 32.

On CUDA the rows go into benchmarks/RESULTS.md under "## GPU (issue 14)" (replacing that section only). Without
CUDA the same code runs as a CPU fallback (DDP over 2 gloo processes, no compile, nothing written unless
--write): it proves the command works, its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.serve_load import write_section
from benchmarks.train import LOG_SAMPLES_PER_S, _peak, make_batch, measure
from jobs.optim import build_optimizer, optimizer_step
from model.codec import decode_plan, encode_plan
from model.config import Config, load_config
from model.generation import generate
from model.model import build_model
from model.objectives import Objective

SECTION = "## GPU (issue 14)"
DATE = "2026-11-30"
NEW_TOKENS = 32


@dataclass
class Row:
    measurement: str
    figure: str
    note: str = ""

    def markdown(self, date: str, machine: str, preset: str) -> str:
        return f"| {date} | {machine} | {preset} | {self.measurement} | {self.figure} | {self.note} |"


# ---------------------------------------------------------------------------
# 1. One device


def training_rows(cfg: Config, device: torch.device, args: argparse.Namespace) -> list[Row]:
    cuda = device.type == "cuda"
    peak = _peak(device)
    runs = [("fp32", False, False)]
    if cuda:
        runs += [("bf16 autocast", True, False), ("bf16 autocast + torch.compile", True, True)]
    elif args.compile:
        runs += [("fp32 + torch.compile", False, True)]
    rows = []
    for label, bf16, compiled in runs:
        rate, flops = measure(
            cfg, device, steps=args.steps, warmup=args.warmup, batch=args.batch, bf16=bf16, compile_=compiled
        )
        mfu = f"MFU {100 * flops / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else f"{flops / 1e12:.3f} TFLOP/s"
        rows.append(
            Row(
                f"train {label}, batch {args.batch}",
                f"{rate:.1f} samples/s",
                f"{mfu}; {rate / LOG_SAMPLES_PER_S:.2f}x the log",
            )
        )
    return rows


# ---------------------------------------------------------------------------
# 2. DDP on every visible GPU


def _ddp_worker(rank: int, world: int, port: int, preset: str, batch: int, steps: int, warmup: int, out: dict) -> None:
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)
        cfg = load_config(preset)
        torch.manual_seed(0)
        objective = Objective(build_model(cfg.model), cfg.objective).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[rank] if cuda else None)
        optimizer = build_optimizer(objective, cfg.train)
        images, ids, mask = make_batch(cfg, batch, device)
        categories = None
        if objective.needs_categories:
            labels = torch.randint(
                1, cfg.objective.num_categories, (batch,), generator=torch.Generator().manual_seed(0)
            )
            categories = torch.nn.functional.one_hot(labels, cfg.objective.num_categories).float().to(device)

        def one_step() -> None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = ddp(images, ids, mask, categories)["loss"]
            optimizer_step(objective, loss, optimizer, None, cfg.train.grad_clip)

        for _ in range(warmup):
            one_step()
        _sync(device)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        _sync(device)
        dist.barrier()
        if rank == 0:
            out["seconds"] = time.perf_counter() - started
    finally:
        dist.destroy_process_group()


def ddp_rows(cfg: Config, device: torch.device, args: argparse.Namespace, one_device_rate: float) -> list[Row]:
    world = torch.cuda.device_count() if device.type == "cuda" else 2
    if device.type == "cuda" and world < 2:
        return [Row("DDP", "-", "one GPU visible: nothing to scale over")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(
            _ddp_worker,
            args=(world, port, cfg.preset, args.batch, args.steps, args.warmup, out),
            nprocs=world,
            join=True,
        )
        seconds = float(out["seconds"])
    rate = world * args.batch * args.steps / seconds
    backend = "NCCL, bf16 autocast" if device.type == "cuda" else "gloo, fp32, 1 thread each"
    return [
        Row(
            f"train DDP x{world} ({backend}), batch {args.batch} per process",
            f"{rate:.1f} samples/s",
            f"{rate / one_device_rate:.2f}x one device ({rate / world / one_device_rate:.0%} per device)",
        )
    ]


# ---------------------------------------------------------------------------
# 3. Serving on the device


def serving_rows(cfg: Config, device: torch.device, args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    m = cfg.model
    fingerprint = "0" * 16

    @torch.inference_mode()
    def caption(images: torch.Tensor) -> list[str]:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            plans = model.encoder(images)  # (B, K, D)
        wire = [encode_plan(p.float(), fingerprint=fingerprint) for p in plans]  # what crosses between the halves
        plans = torch.stack([decode_plan(w, expect_fingerprint=fingerprint) for w in wire]).to(device)  # (B, K, D)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = generate(model.decoder, plans, max_new_tokens=NEW_TOKENS)  # (B, <= NEW_TOKENS)
        _sync(device)
        return [str(row.shape[0]) for row in tokens]

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(0)).to(device)

    single = images(1)
    for _ in range(args.warmup):
        caption(single)
    latencies = []
    for _ in range(args.serve_requests):
        t0 = time.perf_counter()
        caption(single)
        latencies.append((time.perf_counter() - t0) * 1e3)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    batch = images(args.batch)
    caption(batch)
    t0 = time.perf_counter()
    rounds = max(1, args.serve_requests // 4)
    for _ in range(rounds):
        caption(batch)
    rate = args.batch * rounds / (time.perf_counter() - t0)
    return [
        Row(
            f"serve 1 request (encode + wire + {NEW_TOKENS} greedy tokens)",
            f"p50 {statistics.median(latencies):.1f} ms",
            f"p95 {p95:.1f} ms over {len(latencies)}",
        ),
        Row(f"serve batch {args.batch}", f"{rate:.1f} captions/s", f"{NEW_TOKENS} tokens each"),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed_run2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--serve-requests", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="on CPU also time torch.compile (slow to compile)")
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even without CUDA")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    cfg = load_config(args.preset)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        machine = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    else:
        machine = f"CPU fallback, {os.cpu_count()} cores ({platform.machine()}), no CUDA"
        print("benchmarks.gpu: no CUDA device; running the CPU fallback (its figures say nothing about a GPU)")
    print(f"benchmarks.gpu: preset {args.preset}, batch {args.batch}, {args.steps} steps after {args.warmup} warmup")
    rows = training_rows(cfg, device, args)
    for row in rows:
        print(f"  {row.measurement:48s} {row.figure:22s} {row.note}", flush=True)
    one_device = float(rows[1 if cuda else 0].figure.split()[0])  # DDP runs bf16 without compile on CUDA
    more = [] if args.no_ddp else ddp_rows(cfg, device, args, one_device)
    more += serving_rows(cfg, device, args)
    for row in more:
        print(f"  {row.measurement:48s} {row.figure:22s} {row.note}", flush=True)
    rows += more

    header = "| date | machine | preset | measurement | figure | note |\n|---|---|---|---|---|---|"
    table = "\n".join([header, *(r.markdown(DATE, machine, args.preset) for r in rows)])
    if (cuda or args.write) and not args.no_write:
        text = (
            f"{SECTION}\n\nCommand: `python -m benchmarks.gpu --preset {args.preset} --steps {args.steps}` "
            f"(torch {torch.__version__})\n\n{table}\n"
        )
        write_section(text, SECTION)
        print(f"wrote {SECTION!r} in benchmarks/RESULTS.md")
    else:
        print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
