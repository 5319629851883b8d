"""`python -m benchmarks.train` runs one real optimisation step for every preset (the shapes preset's
category loss needs categories in the batch: the command once crashed on it)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.train import measure
from model.config import PRESETS, load_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_one_timed_step_for_every_preset(preset):
    cfg = load_config(preset)
    with torch.random.fork_rng():
        rate, flops = measure(cfg, torch.device("cpu"), steps=1, warmup=0, batch=2, bf16=False, compile_=False)
    assert math.isfinite(rate) and rate > 0
    assert math.isfinite(flops) and flops > 0
