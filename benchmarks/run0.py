"""The log's Run 0 as a learning curve, in one process (no Ray): how fast does a preset learn shapes?

    python -m benchmarks.run0 [--steps 2000] [--per-class 400] [--eval-every 500] [--section.key=value ...]

Draws the synthetic shapes set in memory with `jobs.make_shapes` (train and held-out val from their own
seeds, exactly the images `make_shapes` writes), trains the `shapes` preset's `Objective` (the loss the
Ray Train workers run) with AdamW, warmup then cosine, and prints at each evaluation, on the held-out
images: exact greedy captions, the 18-class probe on the mean-pooled plan, and how often the greedy
caption names the right colour and the right shape. Use it to try recipes in minutes before a Ray run,
for example `--objective.category_weight=0` to see captioning alone stall at colour.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence

import numpy as np
import torch

from jobs import make_shapes
from jobs.caption_metrics import exact_match
from jobs.dataset import multi_hot_categories
from jobs.optim import optimizer_step
from jobs.probe import single_label_probe
from model.config import Config, load_config
from model.generation import caption_images
from model.model import VLJEPA, build_model
from model.objectives import Objective
from model.tokenizer import ByteTokenizer
from model.transform import normalize_uint8


class ShapesSplit:
    """One split of the shapes set in memory: images (N, 3, S, S), 5 captions and the class id per image."""

    def __init__(self, split: str, per_class: int, size: int, seed: int = 0) -> None:
        rng = random.Random(f"{seed}/{split}")  # the same stream make_shapes.write_split uses
        labels = [cls for cls in make_shapes.CLASSES for _ in range(per_class)]
        rng.shuffle(labels)
        pixels, self.captions, self.labels = [], [], []
        for colour, shape in labels:
            img, _bbox, _polygon = make_shapes.draw_shape(rng, colour, shape, size)
            pixels.append(np.asarray(img))
            self.captions.append(make_shapes.captions_for(colour, shape))
            self.labels.append(make_shapes.category_id(colour, shape))
        self.images = torch.from_numpy(normalize_uint8(np.stack(pixels)))  # (N, 3, S, S)

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def evaluate(model: VLJEPA, train: ShapesSplit, val: ShapesSplit, tok: ByteTokenizer) -> dict[str, float]:
    """Held-out exact greedy captions, probe accuracy, colour and shape named right (all in %)."""
    captions: list[str] = []
    for i in range(0, len(val), 64):
        captions += caption_images(model, val.images[i : i + 64], tok)
    model.eval()
    pooled = [
        torch.cat([model.encoder(s.images[i : i + 128]).mean(1) for i in range(0, len(s), 128)]) for s in (train, val)
    ]
    model.train()
    probe = single_label_probe(pooled[0], train.labels, pooled[1], val.labels)
    names = [make_shapes.CLASSES[label - 1] for label in val.labels]
    return {
        "exact_pct": 100.0 * exact_match(captions, val.captions),
        "probe_pct": 100.0 * probe.accuracy,
        "colour_pct": 100.0 * np.mean([colour in c.split() for c, (colour, _) in zip(captions, names, strict=True)]),
        "shape_pct": 100.0 * np.mean([shape in c.split() for c, (_, shape) in zip(captions, names, strict=True)]),
        "unique_greedy": float(len(set(captions))),
    }


def run(
    cfg: Config,
    *,
    steps: int,
    per_class: int,
    val_per_class: int,
    eval_every: int,
    schedule_steps: int = 0,
    model: VLJEPA | None = None,
) -> list[dict[str, float]]:
    """Train for `steps` batches of cfg.train.batch_size on a warmup + cosine schedule of `schedule_steps`
    (0: `steps`; more: stop part way through a longer run's schedule); returns one dict per evaluation.
    `model`: train this freshly built model in place (benchmarks.wire keeps it), instead of a new one."""
    torch.manual_seed(cfg.train.seed)
    size = cfg.model.image_size
    train, val = ShapesSplit("train", per_class, size), ShapesSplit("val", val_per_class, size)
    model = build_model(cfg.model) if model is None else model
    objective = Objective(model, cfg.objective)
    tok = ByteTokenizer(cfg.model.max_seq_length)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    horizon = max(steps, schedule_steps)
    warmup = max(1, horizon // 10)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / horizon)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    draw = random.Random(cfg.train.seed)
    num_categories = cfg.objective.num_categories
    history, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(train), (cfg.train.batch_size,), generator=gen).tolist()
        ids, mask = tok.batch([draw.choice(train.captions[i]) for i in rows])  # one caption drawn per image
        categories = None
        if objective.needs_categories:
            categories = torch.from_numpy(multi_hot_categories([[train.labels[i]] for i in rows], num_categories))
        losses = objective(train.images[rows], ids, mask, categories)
        optimizer_step(objective, losses["loss"], optimizer, scheduler, cfg.train.grad_clip)
        if step % eval_every == 0 or step == steps:
            row = {"step": float(step), "ce": losses["ce"].item(), **evaluate(model, train, val, tok)}
            row["elapsed_s"] = time.perf_counter() - started
            history.append(row)
            print(
                f"step {step:5d}  ce {row['ce']:.3f}  exact {row['exact_pct']:5.1f}%  probe {row['probe_pct']:5.1f}%  "
                f"colour {row['colour_pct']:5.1f}%  shape {row['shape_pct']:5.1f}%  "
                f"unique {int(row['unique_greedy'])}  ({row['elapsed_s']:.0f} s)",
                flush=True,
            )
    return history


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run0", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--per-class", type=int, default=400, help="train images per class (the demo: 400)")
    parser.add_argument("--val-per-class", type=int, default=10, help="held-out images per class")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--schedule-steps", type=int, default=0, help="cosine horizon, if longer than --steps")
    parser.add_argument("--threads", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides)
    print(
        f"preset {args.preset} {' '.join(overrides)}: {args.steps} steps of {cfg.train.batch_size}, "
        f"{args.per_class * 18} train / {args.val_per_class * 18} held-out images, {args.threads} threads"
    )
    run(
        cfg,
        steps=args.steps,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        eval_every=args.eval_every,
        schedule_steps=args.schedule_steps,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
