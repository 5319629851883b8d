"""The optimisation recipe's pieces that do not need Ray: the LR schedule and one optimiser step.

`jobs.train_loop` runs them inside Ray Train workers; `benchmarks.run0` and `benchmarks.train` run the same
step in one process, so a recipe measured there is the recipe the workers run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from model.objectives import Objective


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup to 1, then cosine to 0 at `total_steps` (the log's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


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
