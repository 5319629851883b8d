"""The optimisation recipe's pieces that do not need Ray: the optimiser, the LR schedule, one optimiser step.

`jobs.train_loop` runs them inside Ray Train workers; `benchmarks.run0` and `benchmarks.train` run the same
pieces in one process, so a recipe measured there is the recipe the workers run.

Weight decay, as nanoGPT and open_clip decide it: only the weight matrices of Linear and Conv layers decay
(`train.weight_decay`); biases, LayerNorm gains, token embeddings, learned positions (`pos_embed`), the plan
queries, gates and the like do not (decaying them pulls offsets, scales and lookup rows towards zero for no
regularising benefit). The log applied AdamW's weight decay to every parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from model.config import TrainConfig
from model.objectives import Objective

DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # their "weight" decays; nothing else does


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: [decayed weight matrices, everything else at 0]."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for layer in module.modules():
        for name, param in layer.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # frozen parts and the EMA target are not optimised
                continue
            seen.add(id(param))
            (decay if isinstance(layer, DECAYED_LAYERS) and name == "weight" else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The recipe's AdamW over `module`'s trainable parameters: train.lr, train.weight_decay on weight matrices."""
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup to 1, then cosine to 0 at `total_steps` (the log's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warmup (train.warmup_epochs, the log's rule by default) then cosine to 0 after train.epochs."""
    warmup = cfg.resolved_warmup_epochs() * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, cfg.epochs * steps_per_epoch))


def optimizer_step(
    objective: Objective,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    grad_clip: float,
) -> None:
    """Backward, clip the global grad norm, step the optimiser and the schedule, then move the EMA target."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    objective.update_ema()


def steps_per_epoch(rows: int, batch_size: int, num_workers: int) -> int:
    """Optimiser steps per epoch, as the workers take them: the LR schedule's horizon is counted in these.

    Ray Train splits the training rows equally (`streaming_split(equal=True)` drops the remainder, so each
    worker gets rows // num_workers), and every worker steps on batches of batch_size // num_workers, the last
    one partial. All workers therefore take the same number of steps, which DDP requires.
    """
    per_worker_rows = rows // num_workers
    per_worker_batch = max(1, batch_size // num_workers)
    return max(1, math.ceil(per_worker_rows / per_worker_batch))
