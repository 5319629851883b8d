"""Decode speed: KV-cached vs full-recompute generation at the seed config, on CPU.

    python -m benchmarks.decode [--batch 32] [--new-tokens 64] [--repeats 3] [--preset seed_run2]

Both paths produce the same tokens (checked here too); the figure is the best of `repeats` runs.
A randomly initialised model is used: decode cost does not depend on the weights' values, only on
how many tokens are generated, which is printed (EOS can end rows early, so it is checked).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from model.config import load_config
from model.generation import generate
from model.model import build_model


def _cpu_model() -> str:
    """The CPU's marketing name on Linux (platform.processor() is empty there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed_run2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.preset)
    torch.manual_seed(args.seed)
    model = build_model(cfg.model).eval()
    images = torch.randn(args.batch, 3, cfg.model.image_size, cfg.model.image_size)
    with torch.no_grad():
        plan = model.encoder(images)  # (B, P, D)

    cpu = platform.processor() or _cpu_model() or platform.machine()
    print(
        f"machine: {cpu}, {os.cpu_count()} cpus ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"config: {args.preset} ({cfg.model.conditioning}), batch {args.batch}, {args.new_tokens} new tokens, greedy")

    def run(use_cache: bool) -> torch.Tensor:
        return generate(model.decoder, plan, max_new_tokens=args.new_tokens, use_cache=use_cache)

    run(True)  # warm-up
    # Interleave the two paths so a change in machine load hits both alike; keep each one's best.
    cached_s = full_s = float("inf")
    for _ in range(args.repeats):
        cached_s = min(cached_s, _timed(lambda: run(True)))
        full_s = min(full_s, _timed(lambda: run(False)))
    cached, full = run(True), run(False)
    steps = cached.shape[1]
    print(f"tokens generated per row: {steps}; identical tokens: {torch.equal(cached, full)}")
    print(f"cached:         {cached_s:8.3f} s  ({args.batch * steps / cached_s:8.0f} tokens/s)")
    print(f"full recompute: {full_s:8.3f} s  ({args.batch * steps / full_s:8.0f} tokens/s)")
    print(f"speedup: {full_s / cached_s:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
