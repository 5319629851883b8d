"""The log's Run 0 as a learning curve, in one process: the production recipe, without Ray's orchestration.

    python -m benchmarks.run0 [--steps N] [--per-class 400] [--eval-every 500] [--stop-on-train N]
                              [--json PATH] [--section.key=value ...]

Draws the synthetic shapes set in memory with `jobs.make_shapes` (exactly the images it writes) and keeps each
image as the PNG bytes `jobs.prepare --image-format png` stores. Training runs the production pieces: every
epoch the rows go through the Ray Data map transform (`jobs.dataset.transform_train_batch`: the epoch's seeded
row order and caption draw, decode, tokenise) in chunks of MAP_BATCH_ROWS taken in a seeded per-epoch order,
into the workers' epoch function (`jobs.train_loop.train_epoch`: the `Objective`, `jobs.optim`'s AdamW and
warmup-cosine schedule over train.epochs, clipping, EMA). What Ray adds on top (reading Parquet shards, one
worker per process, DDP) is left out, so a recipe can be tried in minutes; `--steps` stops part way through
the schedule. At each evaluation, on the held-out images: exact greedy captions, the 18-class probe on the
mean-pooled plan, and how often the greedy caption names the right colour and the right shape. Try for
example `--objective.category_weight=0` to see captioning alone stall at colour. `--stop-on-train N` ends the
run early once the first N training images are all captioned exactly (a criterion on training data only; the
held-out figures are then measured once, at that step).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import make_shapes
from jobs.caption_metrics import exact_match
from jobs.dataset import MAP_BATCH_ROWS, transform_train_batch
from jobs.optim import build_optimizer, build_schedule, steps_per_epoch
from jobs.probe import single_label_probe
from jobs.train_loop import _autocast, train_epoch
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
        pixels, self.png, self.captions, self.labels = [], [], [], []
        for colour, shape in labels:
            img, _bbox, _polygon = make_shapes.draw_shape(rng, colour, shape, size)
            pixels.append(np.asarray(img))
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            self.png.append(buffer.getvalue())  # what a prepared PNG shard stores for this image
            self.captions.append(make_shapes.captions_for(colour, shape))
            self.labels.append(make_shapes.category_id(colour, shape))
        self.images = torch.from_numpy(normalize_uint8(np.stack(pixels)))  # (N, 3, S, S)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self) -> dict[str, Any]:
        """The split as prepared rows, ids 1..N in drawing order (what `jobs.prepare` writes)."""
        return {
            "image_id": np.arange(1, len(self) + 1, dtype=np.int64),
            "image": np.array(self.png, dtype=object),
            "captions": np.array(self.captions, dtype=object),
            "category_ids": np.array([[label] for label in self.labels], dtype=object),
        }


class EpochStream:
    """One epoch of training batches as a worker's Ray Data shard yields them.

    Chunks of MAP_BATCH_ROWS rows, in an order seeded by (train.seed, epoch) like the shard order, each through
    the production map transform; batches are cut from the resulting stream across chunk boundaries, the last
    one partial. `iter_batches` (numpy, already cut to the batch size, so re-batching leaves them whole) and
    `iter_torch_batches` hand out the next `take` batches, so an epoch can be trained in pieces.
    """

    def __init__(self, rows: dict[str, Any], cfg: Config, epoch: int) -> None:
        self.rows, self.cfg, self.epoch = rows, cfg, epoch
        self.take = 0
        self._batches = self._generate()

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        n, size = len(self.rows["image_id"]), self.cfg.train.batch_size
        starts = np.random.default_rng([self.cfg.train.seed % 2**63, self.epoch]).permutation(
            np.arange(0, n, MAP_BATCH_ROWS)
        )
        pending: dict[str, np.ndarray] | None = None
        for start in starts:
            chunk = {k: v[start : start + MAP_BATCH_ROWS] for k, v in self.rows.items()}
            out = transform_train_batch(chunk, self.cfg, self.epoch)
            pending = out if pending is None else {k: np.concatenate([pending[k], out[k]]) for k in out}
            while len(pending["image_id"]) >= size:
                yield {k: v[:size] for k, v in pending.items()}
                pending = {k: v[size:] for k, v in pending.items()}
        if pending is not None and len(pending["image_id"]):
            yield pending

    def iter_batches(self, **_: Any) -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(self._batches, self.take)

    def iter_torch_batches(self, **_: Any) -> Iterator[dict[str, torch.Tensor]]:
        return ({k: torch.from_numpy(v) for k, v in batch.items()} for batch in self.iter_batches())


@torch.no_grad()
def train_captions_exact(model: VLJEPA, train: ShapesSplit, tok: ByteTokenizer, count: int) -> bool:
    """True when the greedy captions of the first `count` training images all match a reference: the stopping
    test, on training data only. Decodes 64 images at a time and answers at the first miss (cheap early on)."""
    for i in range(0, min(count, len(train)), 64):
        end = min(i + 64, count)
        if exact_match(caption_images(model, train.images[i:end], tok), train.captions[i:end]) < 1.0:
            return False
    return True


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
    steps: int = 0,
    per_class: int,
    val_per_class: int,
    eval_every: int,
    model: VLJEPA | None = None,
    stop_on_train: int = 0,
    check_every: int = 125,
) -> list[dict[str, float]]:
    """Train on the schedule of cfg.train.epochs over the shapes set, stopping after `steps` steps (0: the whole
    schedule); returns one dict per evaluation (every `eval_every` steps and at the end).
    `model`: train this freshly built model in place (benchmarks.wire keeps it), instead of a new one.
    `stop_on_train` > 0: also stop at the first multiple of `check_every` steps at which the greedy captions
    of the first `stop_on_train` TRAINING images are all exact (`train_captions_exact`); the held-out split
    is only looked at by the evaluations, so it cannot pick the stopping step."""
    torch.manual_seed(cfg.train.seed)
    size = cfg.model.image_size
    train, val = ShapesSplit("train", per_class, size), ShapesSplit("val", val_per_class, size)
    rows = train.rows()
    model = build_model(cfg.model) if model is None else model
    objective = Objective(model, cfg.objective)
    tok = ByteTokenizer(cfg.model.max_seq_length)
    optimizer = build_optimizer(objective, cfg.train)
    per_epoch = steps_per_epoch(len(train), cfg.train.batch_size, 1)
    scheduler = build_schedule(optimizer, cfg.train, per_epoch)
    device, autocast = torch.device("cpu"), _autocast(cfg, torch.device("cpu"))
    total = min(steps or cfg.train.epochs * per_epoch, cfg.train.epochs * per_epoch)
    check_every = check_every if stop_on_train > 0 else total
    history, started, done, stop = [], time.perf_counter(), 0, False
    while done < total and not stop:
        epoch = done // per_epoch + 1
        stream = EpochStream(rows, cfg, epoch)
        while done < min(total, epoch * per_epoch) and not stop:
            # Up to the next evaluation or check point or the end of the epoch, whichever comes first.
            stream.take = min(
                eval_every - done % eval_every, check_every - done % check_every, epoch * per_epoch - done, total - done
            )
            stats = train_epoch(
                objective, objective, optimizer, scheduler, stream, cfg.train.batch_size, device, autocast, cfg, epoch
            )
            done += stream.take
            if stop_on_train > 0 and done % check_every == 0:
                stop = train_captions_exact(model, train, tok, stop_on_train)
            if done % eval_every == 0 or done == total or stop:
                row = {
                    "step": float(done),
                    "epoch": float(epoch),
                    "ce": stats["ce"],
                    **evaluate(model, train, val, tok),
                }
                row["elapsed_s"] = time.perf_counter() - started
                history.append(row)
                print(_format(row), flush=True)
    return history


def _format(row: dict[str, float]) -> str:
    pct = " ".join(f"{k} {row[f'{k}_pct']:5.1f}%" for k in ("exact", "probe", "colour", "shape"))
    unique = int(row["unique_greedy"])
    return f"step {int(row['step']):5d}  ce {row['ce']:.3f}  {pct}  unique {unique}  ({row['elapsed_s']:.0f} s)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run0", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--steps", type=int, default=0, help="stop after N steps (default: all of train.epochs)")
    parser.add_argument("--per-class", type=int, default=400, help="train images per class (the demo: 400)")
    parser.add_argument("--val-per-class", type=int, default=10, help="held-out images per class")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument(
        "--stop-on-train",
        type=int,
        default=0,
        metavar="N",
        help="stop once the greedy captions of the first N training images are all exact (checked every "
        "--check-every steps; default 0: never)",
    )
    parser.add_argument("--check-every", type=int, default=125)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the evaluation rows to PATH as a JSON list")
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides)
    print(
        f"preset {args.preset} {' '.join(overrides)}: {args.steps or 'all'} steps of {cfg.train.batch_size}, "
        f"{args.per_class * 18} train / {args.val_per_class * 18} held-out images, {args.threads} threads"
    )
    history = run(
        cfg,
        steps=args.steps,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        eval_every=args.eval_every,
        stop_on_train=args.stop_on_train,
        check_every=args.check_every,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(history, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
