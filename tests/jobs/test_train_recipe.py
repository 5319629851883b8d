"""The recipe a config names is the recipe that runs: vision weights really loaded (and still bit-identical
when frozen), the LR horizon counted in the steps the workers really take, DDP without an unused-parameter
search, and every check that needs no Ray failing before Ray is started (shown in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import train
from jobs.optim import build_optimizer, steps_per_epoch
from model.checkpoint import save_model
from model.config import load_config
from model.model import build_model
from model.objectives import Objective

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# No Ray


def test_steps_per_epoch_counts_what_the_workers_do():
    # Ray Train's equal split drops the remainder: 49 rows over 2 workers are 24 each, in batches of 4 -> 6 steps
    # (the old count, ceil(49 / 8) = 7, left the cosine above zero at the end of the run).
    assert steps_per_epoch(49, 8, 2) == 6
    assert steps_per_epoch(48, 8, 2) == 6
    assert steps_per_epoch(49, 8, 1) == 7
    assert steps_per_epoch(3, 8, 2) == 1


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["--model.bottleneck=none"],
        ["--model.vision_backbone=frozen"],
        ["--model.conditioning=gated", "--model.plan_dropout=0.2"],
        ["--model.conditioning=prefix_film", "--model.word_dropout=0.3"],
        ["--objective.infonce_weight=1", "--objective.jepa_weight=1", "--objective.jepa_target=text"],
        ["--objective.jepa_weight=1", "--objective.category_weight=1", "--objective.num_categories=5"],
    ],
)
def test_every_trainable_parameter_gets_a_gradient(overrides):
    """Why DDP runs with find_unused_parameters=False: one step reaches every parameter that requires a grad."""
    cfg = load_config("debug", overrides)
    torch.manual_seed(0)
    objective = Objective(build_model(cfg.model), cfg.objective)
    images = torch.randn(4, 3, cfg.model.image_size, cfg.model.image_size)
    ids = torch.randint(4, 260, (4, 10))
    ids[:, 0], ids[:, -1] = 1, 2
    categories = torch.eye(cfg.objective.num_categories)[:4] if objective.needs_categories else None
    objective(images, ids, ids != 0, categories)["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient (DDP would need find_unused_parameters): {missing}"
    assert 'find_unused_parameters": False' in (ROOT / "jobs" / "train_loop.py").read_text()


FAIL_BEFORE_RAY = r"""
import json, sys
import ray

def refuse(*args, **kwargs):
    raise AssertionError("ray.init was called")

ray.init = refuse
from jobs import train

results = []
for args in json.loads(sys.argv[1]):
    print("=== case", file=sys.stderr, flush=True)
    results.append(train.main(args))
print(json.dumps({"codes": results, "ray_initialized": ray.is_initialized()}))
"""


def test_bad_inputs_fail_before_ray_starts(tmp_path):
    """Each bad input exits 2 with a precise message; in a fresh process ray.init is never called."""
    prepared = tmp_path / "prepared"
    (prepared / "train").mkdir(parents=True)
    (prepared / "train" / "part-00000.parquet").write_bytes(b"")  # a split folder without its manifest
    other_shape = tmp_path / "wide.safetensors"
    wide = load_config("debug", ["--model.embed_dim=16"])
    save_model(other_shape, build_model(wide.model), wide)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    nowhere = str(tmp_path / "nowhere")
    debug = ["--preset", "debug", "--data"]
    cases = [
        ([*debug, nowhere], "does not exist"),
        ([*debug, str(prepared)], "has no manifest.json"),
        ([*debug, nowhere, "--train.epoch=3"], "unknown config key 'train.epoch'"),
        (["--preset", "nope", "--data", nowhere], "unknown preset 'nope'"),
        ([*debug, nowhere, "--train.num_workers=3", "--train.batch_size=32"], "does not split evenly"),
        ([*debug, nowhere, "--model.vision_backbone=frozen"], "needs model.vision_weights"),
        ([*debug, nowhere, f"--model.vision_weights={tmp_path / 'missing.safetensors'}"], "no such file"),
        ([*debug, nowhere, f"--model.vision_weights={garbage}"], "not a readable safetensors checkpoint"),
        (
            [*debug, nowhere, "--model.vision_backbone=frozen", f"--model.vision_weights={other_shape}"],
            "vision encoder does not fit this model (embed_dim: checkpoint 16 vs model 32",
        ),
    ]
    _assert_fail_before_ray(cases, tmp_path)


def _assert_fail_before_ray(cases: list[tuple[list[str], str]], tmp_path: Path) -> None:
    """Run `jobs.train.main` on each case in one fresh process whose ray.init raises: each exits 2 with its message."""
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray-tmp")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", FAIL_BEFORE_RAY, json.dumps([args for args, _ in cases])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"codes": [2] * len(cases), "ray_initialized": False}
    messages = proc.stderr.split("=== case")[1:]
    for (args, expected), message in zip(cases, messages, strict=True):
        assert expected in message, (args, message)
    assert not (tmp_path / "ray-tmp").exists()  # no Ray session folder either


@pytest.mark.ray  # for the session's prepared data only: the checked process itself never starts Ray
def test_bad_inputs_on_real_data_fail_before_ray_starts(prepared_shapes, tmp_path):
    data = ["--data", str(prepared_shapes)]
    cases = [
        (["--preset", "shapes", *data, "--objective.num_categories=5"], "num_categories=5 must be at least 19"),
        (["--preset", "debug", *data, "--data.num_samples=1", "--train.num_workers=2"], "cannot feed 2 workers"),
        (["--preset", "debug", *data, "--data.train_split=train2017"], "no split 'train2017'"),
    ]
    _assert_fail_before_ray(cases, tmp_path)


# ---------------------------------------------------------------------------
# Real Ray Train: a frozen encoder loaded from a checkpoint, two workers, 49 rows


# The frozen-weights fix (loaded, bit-identical after training, fingerprint in the checkpoint and MLflow
# params) is checked on the quick study's frozen arm (tests/jobs/test_study.py), and the LR horizon on an uneven
# split on the shared 2-worker runs (49 rows: tests/jobs/test_train.py): a fit of its own here cost 18 s.


def test_weight_decay_only_on_weight_matrices():
    cfg = load_config("debug", ["--objective.jepa_weight=1", "--objective.category_weight=1"])
    objective = Objective(build_model(cfg.model), cfg.objective)
    optimizer = build_optimizer(objective, cfg.train)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in objective.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "model.encoder.vision.blocks.0.attn.qkv.weight" in decayed and "model.decoder.head.weight" in decayed
    assert "model.encoder.vision.patch_embed.weight" in decayed and "category_head.weight" in decayed
    for name in (
        "model.encoder.vision.pos_embed",
        "model.encoder.predictor.queries",
        "model.decoder.tok_embed.weight",
        "model.encoder.vision.blocks.0.norm1.weight",
        "model.encoder.vision.blocks.0.attn.qkv.bias",
    ):
        assert name in kept
    assert all(n.endswith(".weight") and "norm" not in n and "tok_embed" not in n for n in decayed)
    # Every trainable parameter exactly once; the EMA target is not optimised.
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept and not any("ema_encoder" in n for n in trainable)


def test_one_home_for_the_optimiser_and_schedule():
    """The train loop, benchmarks.run0 and benchmarks.train build AdamW and the schedule only through jobs.optim."""
    for path in ("jobs/train_loop.py", "benchmarks/run0.py", "benchmarks/train.py"):
        source = (ROOT / path).read_text()
        assert "AdamW(" not in source and "LambdaLR(" not in source, path
        assert "build_optimizer(" in source, path


@pytest.mark.ray
def test_the_driver_reads_each_shards_ids_once(ray_local, prepared_shapes, monkeypatch):
    """preflight plans the rows; the trainer's dataset reuses the plan instead of reading the shards again."""
    from jobs import dataset, shards

    reads: list[str] = []
    real = shards.pq.read_table

    def counting(path, *args, **kwargs):
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shards.pq, "read_table", counting)
    cfg = load_config("debug", ["--data.val_split=missing", "--data.val_fraction=0.2"])
    checked = train.preflight(cfg, str(prepared_shapes))
    shards = dataset.shard_paths(prepared_shapes / "train")
    # train rows and held-out validation rows come from the same shards: each read once for each purpose
    assert sorted(reads) == sorted(shards * 2) and checked.data.n_train + checked.data.n_val == 180
    reads.clear()
    clock = dataset.epoch_clock()
    dataset.build_train_dataset(checked.data_dir, checked.cfg, clock=clock, plan=checked.data)
    ray_local.kill(clock)
    assert reads == []
