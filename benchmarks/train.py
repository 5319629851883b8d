"""Training throughput at the log's seed config (seed_run2 model, batch 32, 64x64 images), or any preset.

    python -m benchmarks.train [--steps 10] [--warmup 3] [--batch 32] [--compile]

Times full optimisation steps (forward, loss, backward, clip, AdamW) of the same `Objective` the Ray
Train workers run, on random images and COCO-length byte captions, trimmed to the longest caption of
the batch as the training loop does. Prints samples/s in fp32, and on CUDA also with bf16 autocast and the model FLOPs
utilisation (MFU): 6 x (parameters x tokens each module processes) per sample, attention score
FLOPs ignored, against the GPU's dense bf16 peak. The log's scripts ran at about 350 samples/s
(18,000 samples x 100 epochs in ~5,100 s): that is the baseline printed beside the figures.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from jobs.optim import build_optimizer, optimizer_step
from model.config import Config, load_config
from model.model import build_model, query_token_ids, trainable_parameters
from model.objectives import Objective

LOG_SAMPLES_PER_S = 18_000 * 100 / 5_100  # ~353
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def step_flops(model: torch.nn.Module, cfg: Config, batch: int, text_len: int) -> float:
    """Approximate training FLOPs of one step: 6 * sum(module params * tokens through it).

    The text encoder runs once per batch on the fixed query; everything else runs per image.
    """
    m = cfg.model
    q = len(query_token_ids(m.query_text))
    enc = model.encoder
    per_image = {"vision": m.num_patches, "fusion": q, "predictor": q}
    total = 0.0
    for name, n_tokens in per_image.items():
        part = getattr(enc, name, None)
        if part is not None:
            total += trainable_parameters(part) * n_tokens * batch
    total += trainable_parameters(model.decoder) * text_len * batch
    if enc.text is not None:
        total += trainable_parameters(enc.text) * q
    return 6.0 * total


def make_batch(cfg: Config, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images and COCO-length captions (40-69 bytes), padded to the longest like the training loop."""
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, m.image_size, m.image_size, generator=gen)
    lengths = torch.randint(40, 70, (batch,), generator=gen)
    ids = torch.zeros(batch, min(int(lengths.max()) + 2, m.max_seq_length), dtype=torch.long)
    lengths = lengths.clamp(max=ids.shape[1] - 2)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0] = 1  # BOS
        ids[row, 1 : n + 1] = torch.randint(4 + 97, 4 + 123, (n,), generator=gen)  # lowercase bytes
        ids[row, n + 1] = 2  # EOS
    return images.to(device), ids.to(device), (ids != 0).to(device)


def measure(cfg: Config, device: torch.device, *, steps: int, warmup: int, batch: int, bf16: bool, compile_: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(model, cfg.objective).to(device)
    step_fn = torch.compile(objective) if compile_ else objective
    optimizer = build_optimizer(objective, cfg.train)
    images, ids, mask = make_batch(cfg, batch, device)
    categories = None
    if objective.needs_categories:  # e.g. the shapes preset: one random class per image, multi-hot
        labels = torch.randint(1, cfg.objective.num_categories, (batch,), generator=torch.Generator().manual_seed(0))
        categories = torch.nn.functional.one_hot(labels, cfg.objective.num_categories).float().to(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def one_step() -> None:
        with autocast:
            loss = step_fn(images, ids, mask, categories)["loss"]
        optimizer_step(objective, loss, optimizer, None, cfg.train.grad_clip)

    for _ in range(warmup):
        one_step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    elapsed = time.perf_counter() - started
    return batch * steps / elapsed, step_flops(model, cfg, batch, ids.shape[1]) * steps / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--preset", default="seed_run2")
    parser.add_argument("--compile", action="store_true", help="torch.compile the objective")
    args = parser.parse_args()

    cfg = load_config(args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    n_params = trainable_parameters(build_model(cfg.model))
    print(f"training throughput: preset {args.preset} ({n_params:,} params), batch {args.batch}, on {where}")
    print(f"  host {platform.node()}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup} warmup")
    runs = [("fp32", False)] + ([("bf16 autocast", True)] if device.type == "cuda" else [])
    peak = _peak(device)
    for label, bf16 in runs:
        rate, flops = measure(
            cfg, device, steps=args.steps, warmup=args.warmup, batch=args.batch, bf16=bf16, compile_=args.compile
        )
        line = f"  {label:14s} {rate:10.1f} samples/s  ({rate / LOG_SAMPLES_PER_S:5.2f}x the log)"
        line += f"  {flops / 1e12:7.3f} TFLOP/s"
        if peak and bf16:
            line += f"  MFU {100 * flops / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak"
        print(line)
    print(f"  log baseline   {LOG_SAMPLES_PER_S:10.1f} samples/s  (18,000 samples x 100 epochs in ~5,100 s)")


if __name__ == "__main__":
    main()
