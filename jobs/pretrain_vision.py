"""Pretrain the vision encoder alone on a labelled task the data provides, on Ray Train.

    python -m jobs.pretrain_vision --data data/scenes-pq --out runs/vision.safetensors --preset debug \\
        --epochs 5 [--model.embed_dim=64 ...]

    # then: a captioner whose vision encoder is these weights, frozen
    python -m jobs.train --data data/scenes-pq --preset debug --model.vision_backbone=frozen \\
        --model.vision_weights=runs/vision.safetensors

Tasks (picked from what the prepared folder holds):

    scene       a scenes set (scenes.json beside the shards): every grid cell is classified as empty or
                one (size, colour, shape), read from the reference caption. patches (B, N, D) -> mean
                -> Linear -> (B, cells, 1 + values); softmax cross-entropy per cell.
    categories  anything with instance categories (COCO, shapes): multi-label, binary cross-entropy of
                a Linear on the mean-pooled patches against the image's category ids.

The head is thrown away; what is kept is a whole VL-JEPA checkpoint (model.checkpoint format) built
from the same config, whose `encoder.vision.*` tensors are the pretrained encoder and whose other
tensors are at their initialisation. `model.checkpoint.init_vision_from_checkpoint` reads exactly
those tensors, so the file is what `model.vision_weights` names.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jobs.dataset import DataError, decode_images, load_split, shard_paths
from jobs.optim import build_optimizer, warmup_cosine
from jobs.scene_grammar import SceneSpec, parse_caption, read_spec
from model.checkpoint import CHECKPOINT_FILE, save_model
from model.config import Config, ConfigError, load_config, parse_overrides
from model.model import CrossAttention, VisionEncoder, build_model

MODEL_FILE = CHECKPOINT_FILE
VAL_IMAGES = 1000  # held-out images scored each epoch (shipped to the worker in its config)


# ---------------------------------------------------------------------------
# Labels


def scene_values(spec: SceneSpec) -> list[tuple[str, str, str]]:
    """The per-cell classes after "empty" (index 0): every (size, colour, shape)."""
    return [(z, c, s) for z in spec.size_names for c in spec.colour_names for s in spec.shape_names]


def scene_targets(captions: Sequence[str], spec: SceneSpec) -> np.ndarray:
    """Reference captions -> (B, cells) int64 class per cell (0 = empty)."""
    index = {v: i + 1 for i, v in enumerate(scene_values(spec))}
    out = np.zeros((len(captions), spec.cells), dtype=np.int64)
    for row, caption in enumerate(captions):
        scene = parse_caption(caption, spec)
        if scene is None:
            raise DataError(f"caption is not a scene of this set's spec: {caption!r}")
        for obj in scene.objects:
            out[row, obj.cell] = index[(obj.size, obj.colour, obj.shape)]
    return out


def category_targets(category_ids: Sequence[Sequence[int]], num_categories: int) -> np.ndarray:
    """(B, C) float32 multi-hot."""
    out = np.zeros((len(category_ids), num_categories), dtype=np.float32)
    for row, ids in enumerate(category_ids):
        for c in ids:
            if not 0 <= int(c) < num_categories:
                raise DataError(f"category id {c} is outside objective.num_categories={num_categories}")
            out[row, int(c)] = 1.0
    return out


def _map_batch(batch: dict[str, np.ndarray], *, size: int, spec: dict | None, num_categories: int) -> dict:
    """Ray Data task: decode images and build the targets."""
    out = {"images": decode_images(list(batch["image"]), size)}  # (B, 3, S, S)
    if spec is not None:
        out["targets"] = scene_targets([str(caps[0]) for caps in batch["captions"]], SceneSpec.from_dict(spec))
    else:
        out["targets"] = category_targets([list(c) for c in batch["category_ids"]], num_categories)
    return out


# ---------------------------------------------------------------------------
# The model being trained: the captioner's own VisionEncoder + a throw-away head


class PretrainNet(nn.Module):
    """VisionEncoder, then a throw-away head.

    scene: one learned query per grid cell cross-attends to the patches (B, N, D) -> (B, cells, D) ->
    Linear -> (B, cells, 1 + values); a mean-pooled linear head could not tell cells apart quickly.
    categories: mean over patches (B, D) -> Linear -> (B, C).
    """

    def __init__(self, vision: VisionEncoder, dim: int, num_heads: int, outputs: int, cells: int) -> None:
        super().__init__()
        self.vision = vision
        self.cells = cells
        if cells:
            self.queries = nn.Parameter(torch.randn(1, cells, dim) * 0.02)
            self.read = CrossAttention(dim, num_heads)
            self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, outputs // cells if cells else outputs)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.vision(images)  # (B, N, D)
        if not self.cells:
            return self.head(patches.mean(1))  # (B, C)
        q = self.queries.expand(len(images), -1, -1)  # (B, cells, D)
        return self.head(self.norm(self.read(q, patches))).flatten(1)  # (B, cells * (1 + values))


def task_loss(logits: Tensor, targets: Tensor, cells: int) -> tuple[Tensor, Tensor]:
    """(loss, per-row accuracy): per-cell softmax CE for scenes, BCE for categories."""
    if cells:
        logits = logits.view(len(logits), cells, -1)  # (B, cells, 1 + values)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        # accuracy over the cells that hold an object (most cells are empty: "all empty" would score ~70%)
        occupied = targets > 0
        hits = ((logits.argmax(-1) == targets) & occupied).sum(1)
        return loss, hits.float() / occupied.sum(1).clamp_min(1).float()
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    return loss, ((logits > 0).float() == targets).float().mean(1)


def outputs_for(spec: SceneSpec | None, cfg: Config) -> tuple[int, int]:
    """(head outputs, cells): cells = 0 for the categories task."""
    if spec is not None:
        return spec.cells * (1 + len(scene_values(spec))), spec.cells
    return cfg.objective.num_categories, 0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: train, report per-epoch loss and held-out accuracy, checkpoint at the end."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(config["cfg"])
    spec = SceneSpec.from_dict(config["spec"]) if config["spec"] else None
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)  # the vision encoder trains; the rest stays at its init in the checkpoint
    outputs, cells = outputs_for(spec, cfg)
    net = PretrainNet(model.encoder.vision, cfg.model.embed_dim, cfg.model.num_heads, outputs, cells).to(device)
    optimizer = build_optimizer(net, cfg.train)  # the recipe's AdamW and decay groups (jobs.optim)
    steps = int(config["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, cfg.train.epochs * steps))
    train_module = ray.train.torch.prepare_model(net)
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(1, cfg.train.batch_size // ray.train.get_context().get_world_size())
    val = config.get("val")
    for epoch in range(1, cfg.train.epochs + 1):
        started, losses = time.perf_counter(), []
        net.train()
        for batch in shard.iter_torch_batches(batch_size=per_worker, device=device):
            loss, _ = task_loss(train_module(batch["images"]), batch["targets"], cells)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), "epoch_time_s": time.perf_counter() - started}
        if val is not None:
            metrics["val_accuracy"] = held_out_accuracy(net, val, cells, device)
        print(f"pretrain_vision: {_fmt(metrics)}", flush=True)
        if epoch < cfg.train.epochs or ray.train.get_context().get_world_rank() != 0:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix="vljepa-vision-") as folder:
            save_model(Path(folder) / MODEL_FILE, model, cfg, extra={"pretrain_task": config["task"]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


@torch.no_grad()
def held_out_accuracy(net: PretrainNet, val: dict[str, np.ndarray], cells: int, device: Any) -> float:
    """Share of objects classified right (scenes) or of labels right (categories) on the held-out split."""
    net.eval()
    images, targets = torch.from_numpy(val["images"]), torch.from_numpy(val["targets"])
    accs = [
        task_loss(net(images[i : i + 256].to(device)), targets[i : i + 256].to(device), cells)[1].cpu()
        for i in range(0, len(images), 256)
    ]
    return float(torch.cat(accs).mean()) if accs else float("nan")


def _fmt(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


# ---------------------------------------------------------------------------
# Driver


def pretrain_vision(cfg: Config, data_dir: str, out: Path, *, storage: str | None = None) -> dict[str, Any]:
    """Train on Ray Train; copy the checkpoint to `out`; returns the last epoch's metrics (+ "task")."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.runtime import ensure_ray

    root = Path(data_dir).resolve()
    spec = read_spec(root)
    train_dir = root / cfg.data.train_split
    files = shard_paths(train_dir)  # DataError naming the folder when it is missing or empty
    task = "scene" if spec is not None else "categories"
    ensure_ray()
    columns = ["image", "captions", "category_ids"]
    ds = ray.data.read_parquet(files, columns=columns, shuffle="files").map_batches(
        _map_batch,
        fn_kwargs={
            "size": cfg.model.image_size,
            "spec": spec.to_dict() if spec else None,
            "num_categories": cfg.objective.num_categories,
        },
        batch_size=256,
        batch_format="numpy",
    )
    rows = sum(pq_rows(f) for f in files)
    val = None
    if (root / cfg.data.val_split).is_dir():
        split = load_split(root, cfg.data.val_split, cfg.model.image_size, limit=VAL_IMAGES)
        targets = (
            scene_targets([c[0] for c in split.captions], spec)
            if spec is not None
            else category_targets(split.category_ids, cfg.objective.num_categories)
        )
        val = {"images": split.images.numpy(), "targets": targets}
    loop_config = {
        "cfg": cfg.to_dict(),
        "spec": spec.to_dict() if spec else None,
        "task": task,
        "steps_per_epoch": max(1, math.ceil(rows / cfg.train.batch_size)),
        "val": val,
    }
    storage_path = storage or str(Path(cfg.train.storage_path or "runs").resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(name=f"pretrain-vision-{int(time.time())}", storage_path=storage_path),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("pretraining ended without a checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        shutil.copyfile(Path(folder) / MODEL_FILE, out)
    return {**dict(result.metrics or {}), "task": task, "train_rows": rows}


def pq_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.pretrain_vision",
        description="Pretrain the vision encoder on the data's labels; extra --section.key=value override the config.",
    )
    p.add_argument("--data", required=True, help="prepared root (ROOT/<train split>/, optional scenes.json)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (for model.vision_weights)")
    p.add_argument("--preset", default="debug")
    p.add_argument("--epochs", type=int, default=None, help="shortcut for --train.epochs")
    args, extra = p.parse_known_args(argv)
    try:
        overrides = parse_overrides(extra)
        if args.epochs is not None:
            overrides["train.epochs"] = str(args.epochs)
        cfg = load_config(args.preset, overrides)
        started = time.perf_counter()
        metrics = pretrain_vision(cfg, args.data, args.out)
    except (ConfigError, DataError) as exc:
        print(f"pretrain_vision: error: {exc}", file=sys.stderr)
        return 2
    acc = metrics.get("val_accuracy")
    acc_text = f", held-out accuracy {100 * acc:.1f}%" if isinstance(acc, float) and math.isfinite(acc) else ""
    print(
        f"pretrain_vision: task {metrics['task']}, {metrics['train_rows']} images x {cfg.train.epochs} epochs"
        f"{acc_text}, {time.perf_counter() - started:.0f}s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
