"""What every Ray Train worker runs: the log's recipe, one checkpoint per epoch, restore on restart.

    train_loop_per_worker(config)   config = {"cfg": Config.to_dict(), "data_dir": ..., "steps_per_epoch": ...,
                                              "tracking_uri": ..., "mlflow_run_id": ...,
                                              "vision_weights_fingerprint": ... or None,
                                              "epoch_clock": jobs.dataset.EpochClock actor}

Per worker: build the model, load `model.vision_weights` into its vision encoder (the driver checked the
file and sent its fingerprint; a file that changed since is an error), wrap the `Objective` (model + EMA
target, losses) in DDP through
`ray.train.torch.prepare_model`, then for each epoch stream its shard of the training dataset,
step AdamW with linear warmup + cosine decay (per step) and gradient clipping, and report.
Rank 0 also evaluates on a small slice of the validation split (teacher-forced CE, greedy
captions), writes the checkpoint folder, and logs metrics and sample captions to MLflow.

A checkpoint folder holds `model.safetensors` (weights + config, what serving loads) and
`train_state.pt` (optimizer, schedule, epoch, RNG, EMA target) written with plain tensors and
containers only, so `torch.load(weights_only=True)` reads it back.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from jobs import dataset
from jobs.caption_metrics import exact_match, unique_captions
from jobs.optim import build_optimizer, build_schedule, optimizer_step
from model.backbones import load_backbone_weights
from model.checkpoint import CHECKPOINT_FILE, init_vision_from_checkpoint, load_model, model_fingerprint, save_model
from model.config import Config
from model.generation import caption_images
from model.model import VLJEPA, build_model
from model.objectives import Objective, references_ce
from model.tokenizer import ByteTokenizer
from model.transform import IMAGENET_MEAN, IMAGENET_STD

MODEL_FILE = CHECKPOINT_FILE
STATE_FILE = "train_state.pt"
KILL_EPOCH_ENV = "VLJEPA_TEST_KILL_AT_EPOCH"  # test hook: rank 0 dies mid-epoch N once
KILL_MARKER_ENV = "VLJEPA_TEST_KILL_MARKER"  # ... unless this file exists (then it is a restart)
VISION_FINGERPRINT_KEY = "vision_weights_fingerprint"  # checkpoint metadata and MLflow param
MAX_EVAL_IMAGES = 256  # validation slice for per-epoch metrics; jobs.evaluate scores the whole split


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    _seed_everything(cfg.train.seed + rank)

    model = build_model(cfg.model)
    load_backbone_weights(model.encoder.vision, cfg.model)  # a timm backbone's pretrained weights, if any
    # Before the Objective copies the encoder for its EMA target, and before DDP broadcasts rank 0's weights.
    vision_fingerprint = init_vision(model, cfg)
    if vision_fingerprint != config.get("vision_weights_fingerprint"):
        raise RuntimeError(
            f"model.vision_weights={cfg.model.vision_weights} changed since the driver checked it "
            f"(fingerprint {config.get('vision_weights_fingerprint')} then, {vision_fingerprint} now)"
        )
    objective = Objective(model, cfg.objective).to(device)
    optimizer = build_optimizer(objective, cfg.train)
    scheduler = build_schedule(optimizer, cfg.train, int(config["steps_per_epoch"]))

    # Restore before DDP wraps the module: every rank loads the same checkpoint.
    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_epoch = restore(Path(folder), objective, optimizer, scheduler, rank) + 1

    # Every parameter that requires a gradient gets one each step, for every config (a frozen vision
    # encoder requires none; bottleneck=none does not build the parts it skips; tests/jobs/test_train_recipe.py
    # checks it), so DDP needs no per-step search for unused parameters.
    train_module = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": False})
    if cfg.train.compile:
        train_module = torch.compile(train_module)
    autocast = _autocast(cfg, device)

    shard = ray.train.get_dataset_shard("train")
    per_worker_batch = max(1, cfg.train.batch_size // world)
    evaluator = Evaluator(cfg, config["data_dir"], device) if rank == 0 else None
    logger = _epoch_logger(config) if rank == 0 else None

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        if rank == 0 and config.get("epoch_clock") is not None:
            # Before this epoch's data starts: shard order and caption draws are seeded by (train.seed, epoch).
            ray.get(config["epoch_clock"].set.remote(epoch))
        started = time.perf_counter()
        stats = train_epoch(
            train_module, objective, optimizer, scheduler, shard, per_worker_batch, device, autocast, cfg, epoch
        )
        stats = _all_reduce_mean(stats, device)
        elapsed = time.perf_counter() - started
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "start_epoch": start_epoch,  # > 1 when this worker group restored a checkpoint
            "lr": scheduler.get_last_lr()[0],
            "epoch_time_s": elapsed,
            "samples_per_s": stats.pop("samples") / max(elapsed, 1e-9),
            "steps": int(stats.pop("steps")),  # per worker; the LR horizon assumes steps_per_epoch
            **{f"train_{k}": v for k, v in stats.items()},
        }
        rng_states = _gather_rng_states()  # every rank's, so a resumed run continues each rank's streams
        if rank != 0:
            ray.train.report(metrics)
            continue
        samples = evaluator.evaluate(objective.model)
        metrics.update(samples.metrics)
        if config.get("mlflow_run_id"):
            metrics["mlflow_run_id"] = config["mlflow_run_id"]  # a string: sweeps read it from the result
        with tempfile.TemporaryDirectory(prefix="vljepa-ckpt-") as folder:
            write_checkpoint(
                Path(folder),
                objective,
                optimizer,
                scheduler,
                cfg,
                epoch,
                vision_fingerprint,
                metrics.get("val_ce"),
                rng_states=rng_states,
            )
            if logger is not None:
                logger.log_metrics(metrics, step=epoch)
                logger.log_samples(epoch, samples.images, samples.references, samples.captions)
            print(_format_epoch(metrics), flush=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def init_vision(model: VLJEPA, cfg: Config) -> str | None:
    """Copy `cfg.model.vision_weights` (a checkpoint path) into the model's vision encoder.

    Returns the fingerprint of the loaded vision tensors (`model_fingerprint` of `encoder.vision`), or None
    when no weights are configured. With `vision_backbone=frozen` these tensors never change again; with
    `scratch` they are the starting point that training fine-tunes. Raises FileNotFoundError or
    CheckpointError for a missing file or one whose vision encoder does not fit this model.
    """
    if not cfg.model.vision_weights:
        return None
    init_vision_from_checkpoint(model, cfg.model.vision_weights)
    return model_fingerprint(model.encoder.vision.state_dict())


# ---------------------------------------------------------------------------
# One epoch of optimisation


def train_epoch(
    train_module: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    shard: Any,
    batch_size: int,
    device: torch.device,
    autocast: Any,
    cfg: Config,
    epoch: int,
) -> dict[str, float]:
    """Stream the shard once; returns summed-then-averaged losses and the sample count."""
    train_module.train()
    sums: dict[str, float] = {}
    steps = samples = 0
    for batch in dataset.torch_batches(shard, batch_size, cfg, epoch=epoch, device=device):
        images = batch["images"].to(device, non_blocking=True)  # (B, 3, S, S)
        # Captions come padded to max_seq_length; the decoder only needs the longest one in the batch.
        length = int(batch["caption_mask"].sum(1).max())
        ids = batch["caption_ids"][:, :length].to(device, non_blocking=True)  # (B, T')
        mask = batch["caption_mask"][:, :length].to(device, non_blocking=True)  # (B, T')
        categories = batch.get("categories")
        if categories is not None:
            categories = categories.to(device, non_blocking=True)  # (B, C) multi-hot
        with autocast:
            losses = train_module(images, ids, mask, categories)
        optimizer_step(objective, losses["loss"], optimizer, scheduler, cfg.train.grad_clip)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        steps += 1
        samples += images.shape[0]
        _maybe_die_for_test(epoch, steps)
    out = {key: value / max(steps, 1) for key, value in sums.items()}
    out["samples"] = float(samples)
    out["steps"] = float(steps)
    return out


def _autocast(cfg: Config, device: torch.device) -> Any:
    """bf16 autocast on CUDA (precision auto/bf16); plain fp32 everywhere else."""
    if device.type == "cuda" and cfg.train.precision in ("auto", "bf16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _all_reduce_mean(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average the per-worker means over the group (samples are summed) so rank 0 reports the whole epoch."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    world = torch.distributed.get_world_size()
    return {k: (v if k == "samples" else v / world) for k, v in zip(keys, values.tolist(), strict=True)}


def _maybe_die_for_test(epoch: int, step: int) -> None:
    """Test hook: rank 0 kills its own process after the first step of epoch N, once per marker file."""
    target = os.environ.get(KILL_EPOCH_ENV)
    marker = os.environ.get(KILL_MARKER_ENV)
    if not target or not marker or int(target) != epoch or step != 1:
        return
    if ray.train.get_context().get_world_rank() != 0 or os.path.exists(marker):
        return
    # Die only once the controller has registered the previous epoch's checkpoint, so the test
    # exercises "restore from the last checkpoint" rather than a race with the controller's polling.
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    Path(marker).write_text(f"killed at epoch {epoch}\n")
    print(f"[test hook] worker 0 exits mid-epoch {epoch}", flush=True)
    os._exit(1)


# ---------------------------------------------------------------------------
# Checkpoints: write, restore


def write_checkpoint(
    folder: Path,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    epoch: int,
    vision_fingerprint: str | None = None,
    val_ce: float | None = None,
    *,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    # epoch and val_ce in the checkpoint itself: jobs.checkpoints picks a run folder's best by them.
    extra = {"epoch": str(epoch)} | ({"val_ce": repr(float(val_ce))} if val_ce is not None else {})
    if vision_fingerprint:  # which weights the vision encoder started from (frozen: still holds)
        extra |= {"vision_weights": cfg.model.vision_weights, VISION_FINGERPRINT_KEY: vision_fingerprint}
    save_model(folder / MODEL_FILE, objective.model, cfg, extra=extra)
    model_keys = {f"model.{k}" for k in objective.model.state_dict()}
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),  # rank 0's
        "rng_ranks": rng_states or [_rng_state()],  # one per rank, in rank order
        # Whatever the objective holds beyond the model (the EMA target encoder).
        "objective_extra": {k: v.detach().cpu() for k, v in objective.state_dict().items() if k not in model_keys},
    }
    torch.save(state, folder / STATE_FILE)


def restore(
    folder: Path,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> int:
    """Load weights, optimizer, schedule and RNG from a checkpoint folder; returns its epoch."""
    device = next(objective.parameters()).device
    loaded = load_model(folder / MODEL_FILE, map_location=device)
    objective.model.load_state_dict(loaded.model.state_dict())
    state = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["objective_extra"]:
        objective.load_state_dict(state["objective_extra"], strict=False)
    ranks = state.get("rng_ranks") or []
    if rank < len(ranks):
        _set_rng_state(ranks[rank], 0)
    else:  # more ranks than the run that wrote it (or an older checkpoint): offset rank 0's streams
        _set_rng_state(state["rng"], rank)
    print(f"[rank {rank}] restored epoch {state['epoch']} from {folder}", flush=True)
    return int(state["epoch"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values (numpy's key array becomes an int64 tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": {"has": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),  # (version, tuple of ints, None)
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: all ranks call it)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [_rng_state()]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, _rng_state())
    return out


def _set_rng_state(state: dict[str, Any], rank: int) -> None:
    # rank > 0: the state is another rank's; offset it so workers do not draw the same numbers.
    torch.set_rng_state(state["torch"].cpu())
    if rank:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,))) + rank)
    keys = state["numpy"]["keys"].cpu().numpy().astype(np.uint32)
    gauss = state["numpy_gauss"]
    np.random.set_state((state["numpy"]["name"], keys, state["numpy"]["pos"], gauss["has"], gauss["cached"]))
    random.setstate(tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ---------------------------------------------------------------------------
# Rank-0 evaluation on a slice of the validation split


class EvalResult:
    def __init__(self, metrics: dict[str, float], images: list, references: list[str], captions: list[str]):
        self.metrics, self.images, self.references, self.captions = metrics, images, references, captions


class Evaluator:
    """Validation CE (teacher forced, no label smoothing) and greedy captions on the first
    MAX_EVAL_IMAGES validation images.

    val_ce is `model.objectives.references_ce` over `PlanEncoder.encode`'s plans: what
    `jobs.evaluate` reports as final_ce for the same model, split and image cap, by construction.
    Exact match and unique captions come from jobs.caption_metrics.
    """

    def __init__(self, cfg: Config, data_dir: str, device: torch.device):
        self.cfg, self.device = cfg, device
        self.tokenizer = ByteTokenizer(cfg.model.max_seq_length)
        split = dataset.load_eval_split(data_dir, cfg, limit=MAX_EVAL_IMAGES)
        self.images: Tensor = split.images if split is not None else torch.zeros(0, 3, 1, 1)  # (N, 3, S, S)
        self.references: list[list[str]] = split.captions if split is not None else []

    @torch.no_grad()
    def evaluate(self, model: VLJEPA) -> EvalResult:
        if not self.references:  # no validation data configured (val_fraction 0 and no val split)
            return EvalResult({}, [], [], [])
        was_training = model.training
        model.eval()
        try:
            plans = model.encoder.encode(self.images)  # (N, P, D)
            (val_ce,) = references_ce(model.decoder, plans, self.references, max_chars=self.cfg.data.max_caption_chars)
            captions = self._greedy(model)
        finally:
            model.train(was_training)
        n = len(captions)
        metrics = {
            "val_ce": val_ce,
            "greedy_unique_pct": unique_captions(captions)[1],
            "exact_match_pct": 100.0 * exact_match(captions, self.references),
        }
        k = min(self.cfg.train.eval_samples, n)
        shown = [_to_pil(self.images[i]) for i in range(k)]
        return EvalResult(metrics, shown, [self.references[i][0] for i in range(k)], captions[:k])

    def _greedy(self, model: VLJEPA, batch: int = 128) -> list[str]:
        out: list[str] = []
        for start in range(0, self.images.shape[0], batch):
            images = self.images[start : start + batch].to(self.device)
            out += caption_images(model, images, self.tokenizer)
        return out


def _to_pil(image: Tensor) -> Any:
    """Undo the ImageNet normalisation of one (3, S, S) tensor for the MLflow sample table."""
    from PIL import Image

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((image.cpu().float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _epoch_logger(config: dict[str, Any]) -> Any:
    if not config.get("mlflow_run_id"):
        return None
    from jobs.tracking import EpochLogger  # MLflow only where a run is tracked

    return EpochLogger(config["tracking_uri"], config["mlflow_run_id"])


def _format_epoch(m: dict[str, Any]) -> str:
    def f(key: str, fmt: str = ".4f") -> str:
        value = m.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "n/a"

    return (
        f"epoch {m['epoch']}: loss {f('train_loss')} ce {f('train_ce')} val_ce {f('val_ce')} "
        f"greedy unique {f('greedy_unique_pct', '.1f')}% exact {f('exact_match_pct', '.1f')}% "
        f"({f('samples_per_s', '.0f')} samples/s)"
    )
