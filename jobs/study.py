"""The bottleneck study: can a K x D plan carry an image? Controls, arms, seeds, and a verdict.

    python -m jobs.study --data data/scenes-pq --quick                  # a few tiny trials, ~1 minute
    python -m jobs.study --data data/scenes-pq --out benchmarks/study   # the laptop study (see README)
    RAY_ADDRESS=... python -m jobs.study --data s3://bucket/coco-prepared --preset seed_run2 --storage s3://...

What it runs, on the Ray cluster it finds (jobs.runtime):

    1. pretrain the vision encoder on the data's labels (jobs.pretrain_vision; scenes: per-cell
       attributes, COCO: instance categories) -> the "frozen" features, unless --vision-weights names one
    2. one Ray Tune trial per (arm, seed) through jobs.sweep's machinery (each trial a Ray Train job and
       an MLflow run under the study's parent run, evaluated by jobs.evaluate when it ends):
         bottleneck: none (the control) | plan with K in {1, 4, 16, 64}
         features:   scratch (captioning only) | category (+ category loss on the plan) | frozen (pretrained)
       --arms picks another set (ARM_SETS): the levers at K=16 vary one thing each (the decoder's
       conditioning, the plan former's depth, the training budget) and --merge LABEL=rows.json reports
       an earlier run's rows beside them, each row named with the run it came from
    3. scenes sets: every trial's checkpoint is also scored on the compositional split ("compo")
    4. the report (jobs.study_report): per-arm table, plots, the verdict by written rules, written to
       --out and logged to the parent MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobs import study_report
from jobs.scene_grammar import read_spec
from jobs.sweep_spaces import Space, build_config, resolve
from model.config import ConfigError, parse_overrides

EXIT_INVALID = 2


@dataclass(frozen=True)
class ArmSpec:
    """One arm: K (None = the no-bottleneck control), features, seeds, and the overrides that make it a
    variant of that recipe (decoder conditioning, training budget, plan-former depth)."""

    k: int | None
    features: str  # scratch | category | frozen
    seeds: str | tuple[int, ...] = "main"  # "main" = range(--seeds)
    variant: tuple[tuple[str, Any], ...] = ()


FULL_ARMS = [
    ArmSpec(None, "scratch"),
    ArmSpec(16, "scratch"),
    ArmSpec(16, "category", (0,)),
    ArmSpec(16, "frozen", (0,)),
    ArmSpec(1, "scratch", (0,)),
    ArmSpec(4, "scratch", (0,)),
    ArmSpec(64, "scratch", (0,)),
    ArmSpec(None, "frozen", (0,)),
]
# The levers at the log's K that tell trainability from the plan former's capacity (run 2 of the
# laptop study): the decoder's conditioning type, a deeper plan former, a second frozen seed ...
LEVER_ARMS = [
    ArmSpec(16, "scratch", (0,), (("model.conditioning", "gated"),)),
    ArmSpec(16, "scratch", (0,), (("model.conditioning", "prefix_film"),)),
    ArmSpec(16, "scratch", (0,), (("model.fusion_depth", 3), ("model.semantic_predictor_depth", 3))),
    ArmSpec(16, "frozen", (1,)),
]
# ... and twice the training steps: does the plan climb toward the control with more steps?
BUDGET_ARMS = [
    ArmSpec(16, "scratch", (0,), (("train.epochs", 24),)),
    ArmSpec(16, "frozen", (0,), (("train.epochs", 24),)),
]
# ... and the lever that moved the plan most in run 2 (the gated decoder) tested again: a second seed,
# with frozen features, with twice the steps, and at K=64 (is the gated plan still flat across K?).
GATED_ARMS = [
    ArmSpec(16, "scratch", (0,), (("model.conditioning", "gated"), ("train.epochs", 24))),
    ArmSpec(16, "scratch", (1,), (("model.conditioning", "gated"),)),
    ArmSpec(16, "frozen", (0,), (("model.conditioning", "gated"),)),
]
# The follow-up: the frozen control at the doubled budget (the matched control of K16/frozen+24ep), and
# the gated plan at K=64.
FOLLOWUP_ARMS = [
    ArmSpec(None, "frozen", (0,), (("train.epochs", 24),)),
    ArmSpec(64, "scratch", (0,), (("model.conditioning", "gated"),)),
]
QUICK_ARMS = [ArmSpec(None, "scratch", (0,)), ArmSpec(4, "scratch", (0,)), ArmSpec(4, "frozen", (0,))]
ARM_SETS = {
    "full": FULL_ARMS,
    "levers": LEVER_ARMS,
    "budget": BUDGET_ARMS,
    "gated": GATED_ARMS,
    "followup": FOLLOWUP_ARMS,
    "quick": QUICK_ARMS,
}

# The laptop study's model on a scenes set: the debug preset's shape, a bit wider and deeper.
SCENES_MODEL = {
    "model.embed_dim": 64,
    "model.num_heads": 4,
    "model.encoder_depth": 2,
    "model.text_encoder_depth": 1,
    "model.fusion_depth": 1,
    "model.semantic_predictor_depth": 1,
    "model.decoder_depth": 2,
    "model.patch_size": 8,
    "model.max_seq_length": 144,
    "objective.diversity_weight": 0.0,  # at 0.5 it collapsed the shapes decoder to 2 captions (RESULTS.md)
    "train.batch_size": 32,
    "train.lr": 1e-3,
    "train.epochs": 12,  # ~4 min a trial on 2 quiet cores; the control reaches 97% of the bits
    "train.eval_samples": 2,
    "data.num_samples": 0,
}
QUICK_MODEL = {
    "model.embed_dim": 32,
    "model.num_heads": 2,
    "model.encoder_depth": 1,
    "model.decoder_depth": 1,
    "train.epochs": 1,
    "train.batch_size": 16,
}


def arm_points(arms: Sequence[ArmSpec], seeds: int, vision_weights: str) -> list[dict]:
    """Trial points (dotted config keys) for every arm and seed."""
    points = []
    for arm in arms:
        for seed in range(seeds) if arm.seeds == "main" else arm.seeds:
            point: dict[str, Any] = {"model.bottleneck": "none" if arm.k is None else "plan"}
            if arm.k is not None:
                point["model.num_latent_vectors"] = arm.k
            point["objective.category_weight"] = 1.0 if arm.features == "category" else 0.0
            point["model.vision_backbone"] = "frozen" if arm.features == "frozen" else "scratch"
            point["model.vision_weights"] = vision_weights if arm.features == "frozen" else ""
            point.update(arm.variant)
            point["train.seed"] = seed
            points.append(point)
    return points


def study_space(args: argparse.Namespace, spec: Any) -> Space:
    """Base preset + the study's fixed overrides (the scenes model when the data is a scenes set)."""
    overrides: dict[str, Any] = {}
    if spec is not None:
        overrides.update(SCENES_MODEL)
        overrides["model.image_size"] = spec.image_size
        overrides["objective.num_categories"] = spec.colours * spec.shapes + 1  # the set's ids run 1..C*S
        if args.quick:
            overrides.update(QUICK_MODEL)
    overrides["tracking.experiment"] = args.experiment
    return Space(name="study", base_preset=args.preset, overrides=overrides, grid={"arm": []})


def pretrain(args: argparse.Namespace, space: Space, base: dict[str, Any], out: Path, storage: Path) -> str:
    """Pretrain the study config's vision encoder unless --vision-weights is given; returns the file."""
    if args.vision_weights:
        return str(Path(args.vision_weights).resolve())
    from jobs.pretrain_vision import pretrain_vision

    cfg = build_config(space, {}, base)
    from model.config import apply_overrides

    cfg = apply_overrides(
        cfg, {"train.epochs": args.pretrain_epochs, "train.batch_size": 64, "train.lr": 2e-3}
    ).validate()
    path = storage / "vision.safetensors"  # beside the trials, not in the report folder
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    metrics = pretrain_vision(cfg, args.data, path, storage=str(Path(args.storage).resolve()))
    acc = metrics.get("val_accuracy")
    print(
        f"study: pretrained the vision encoder ({metrics['task']}, {args.pretrain_epochs} epochs, "
        f"held-out accuracy {acc if acc is None else f'{100 * acc:.1f}%'}) in {time.perf_counter() - started:.0f}s"
    )
    (out / "pretrain.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return str(path.resolve())


def score_compo(rows: list[dict[str, Any]], data: str) -> bool:
    """Score each trial's checkpoint on the compositional split, as compo_scene_* columns."""
    if not (Path(data) / "compo").is_dir():
        return False
    from jobs.evaluate import evaluate_model

    for row in rows:
        if not row.get("checkpoint"):
            continue
        try:
            m = evaluate_model(row["checkpoint"], data, split="compo")
        except Exception as exc:  # one bad checkpoint costs its columns, not the study
            row["compo_error"] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        row.update({f"compo_{k}": v for k, v in m.items() if k.startswith("scene_")})
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    started = time.perf_counter()
    spec = read_spec(args.data) if "://" not in args.data else None
    try:
        base = parse_overrides(extra)
        space = study_space(args, spec)
        build_config(space, {}, base)  # a bad override fails here, before anything starts
    except ConfigError as exc:
        print(f"study: {exc}", file=sys.stderr)
        return EXIT_INVALID
    name = args.name or ("study-quick" if args.quick else "study")
    out = Path(args.out or Path(args.storage) / name / "study").resolve()
    out.mkdir(parents=True, exist_ok=True)
    metric = args.metric or ("scene_bits_recovered_pct" if spec is not None else "cider_d")

    from jobs.runtime import ensure_ray

    try:
        merged = [row for m in args.merge for row in merge_rows(m)]
    except (OSError, ValueError) as exc:
        print(f"study: --merge: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"study: Ray: {ensure_ray(args.cpus)}")
    vision = pretrain(args, space, base, out, Path(args.storage).resolve() / name)
    arms = ARM_SETS["quick" if args.quick else args.arms]
    points = arm_points(arms, 1 if args.quick else args.seeds, vision)
    trials, errors, notes = resolve(space, points, base)
    if errors:
        print("study: invalid trial points:\n  " + "\n  ".join(errors), file=sys.stderr)
        return EXIT_INVALID
    space.grid = {k: [] for p in points for k in p}  # the swept keys, for the sweep table's columns

    from jobs import sweep
    from jobs.storage import storage_uri

    # jobs.sweep's own defaults (whatever options it grows), then the study's choices.
    sweep_args = sweep._parser().parse_args(["--space", "study", "--data", args.data])
    sweep_args.name, sweep_args.storage, sweep_args.metric = name, args.storage, metric
    sweep_args.mode = "max" if metric != "final_ce" else "min"
    sweep_args.scheduler = "fifo"  # every arm trains its whole budget: the study compares end points
    sweep_args.trial_cpus, sweep_args.data_cpus = args.trial_cpus, 1.0
    sweep_args.max_concurrent, sweep_args.eval_max_images = args.max_concurrent, args.eval_max_images
    code = sweep.run_sweep(sweep_args, space, trials, base, notes)
    experiment = Path(storage_uri(args.storage)) / name  # where jobs.sweep put the trials and its rows
    rows_file = experiment / "report" / "rows.json"
    if not rows_file.is_file():
        print(f"study: the sweep wrote no rows ({rows_file})", file=sys.stderr)
        return code or 1
    rows = json.loads(rows_file.read_text())
    compo = score_compo(rows, args.data) if spec is not None else False
    label = args.run_label or f"{name} {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    for row in rows:
        row["study_run"] = label
    compo = compo or any("compo_scene_bits_recovered_pct" in r for r in merged)
    rows = merged + rows

    arms_summary = study_report.summarise(rows)
    verdict = study_report.verdict(arms_summary, metric)
    runtime = time.perf_counter() - started
    header = _header(args, argv, spec, runtime, len(rows) - len(merged), len(merged))
    md = study_report.markdown(arms_summary, verdict, metric=metric, header=header, compo=compo)
    (out / "report.md").write_text(md)
    (out / "rows.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    (out / "verdict.txt").write_text(f"{verdict.label}\n" + "\n".join(verdict.reasons) + "\n")
    plots = study_report.plots(out, arms_summary, metric, spec_bits(args.data))
    _log_mlflow(experiment, out, verdict, [out / "report.md", out / "verdict.txt", out / "rows.json", *plots])
    print(md)
    print(f"study: report in {out} ({runtime / 60:.1f} min)")
    print(f"study: verdict: {verdict.label}")
    return 0 if code == 0 else code


def merge_rows(spec: str) -> list[dict[str, Any]]:
    """`LABEL=PATH`: an earlier study's rows.json, each row tagged with the run it came from (rows that
    already carry a `study_run` keep it), so one report can show arms from several runs honestly."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"{spec!r}: expected LABEL=PATH/rows.json")
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: not a list of rows")
    for row in rows:
        row.setdefault("study_run", label)
    return rows


def spec_bits(data: str) -> float | None:
    path = Path(data) / "scenes.json"
    return json.loads(path.read_text())["bits_per_image"] if path.is_file() else None


def _header(
    args: argparse.Namespace, argv: Sequence[str] | None, spec: Any, runtime: float, n: int, merged: int
) -> list[str]:
    command = "python -m jobs.study " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    lines = [
        f"- command: `{command}`",
        f"- data: `{args.data}`"
        + (f" (scenes: {json.dumps(spec.to_dict())}, {spec_bits(args.data):.2f} bits per image)" if spec else ""),
        f"- trials: {n}"
        + (f" (+ {merged} rows merged from earlier runs)" if merged else "")
        + f"; runtime {runtime / 60:.1f} min (pretraining, trials, evaluation, report)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
        + (f"; {args.machine}" if args.machine else ""),
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    return lines


def _log_mlflow(experiment: Path, out: Path, verdict: study_report.Verdict, files: list[Path]) -> None:
    """The report and plots on the study's parent MLflow run (created by the sweep machinery)."""
    meta_file = experiment / "sweep.json"
    if not meta_file.is_file():
        return
    meta = json.loads(meta_file.read_text())
    if not meta.get("parent_run_id"):
        return
    from mlflow import MlflowClient

    client = MlflowClient(meta["tracking_uri"])
    for path in files:
        client.log_artifact(meta["parent_run_id"], str(path), artifact_path="study")
    client.set_tag(meta["parent_run_id"], "study.verdict", verdict.label)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.study",
        description="The bottleneck study; extra --section.key=value arguments override every trial's config.",
    )
    p.add_argument("--data", required=True, help="prepared root (a scenes set gets per-attribute scores)")
    p.add_argument("--quick", action="store_true", help="3 tiny trials, 1 epoch each: a smoke test")
    p.add_argument("--preset", default="debug", help="base preset (COCO on a cluster: seed_run2)")
    p.add_argument("--arms", choices=sorted(ARM_SETS), default="full", help="which arms to run (see ARM_SETS)")
    p.add_argument(
        "--merge", action="append", default=[], help="LABEL=rows.json of an earlier study to report beside (repeat)"
    )
    p.add_argument("--run-label", default="", help="how this run's rows are named in the report")
    p.add_argument("--cpus", type=int, default=None, help="logical CPUs of a local Ray instance (default 4)")
    p.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs each trial's driver holds")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the main arms (the control and the K=16 plan)")
    p.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of vision pretraining")
    p.add_argument("--vision-weights", default="", help="use this pretrained checkpoint instead of pretraining")
    p.add_argument("--name", default=None, help="study name (the same name again resumes its trials)")
    p.add_argument("--storage", default="runs", help="where trials go (local folder or URI)")
    p.add_argument("--out", default=None, help="report folder (default STORAGE/NAME/study)")
    p.add_argument("--experiment", default="vl-jepa-study", help="MLflow experiment")
    p.add_argument("--metric", default=None, help="score the verdict uses (default: scene_bits_recovered_pct)")
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once")
    p.add_argument("--eval-max-images", type=int, default=None, help="evaluate each trial on at most N images")
    p.add_argument("--machine", default="", help="a note on the machine for the report")
    return p


if __name__ == "__main__":
    sys.exit(main())
