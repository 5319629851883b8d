"""The README's first command: the log's Run 0, end to end, on a laptop.

    python -m jobs.demo [--out demo_out] [--epochs N] [--per-class N]

1. starts a local Ray instance;
2. writes the synthetic shapes set (6 colours x 3 shapes, COCO layout) and prepares train and val
   to Parquet with the same `jobs.prepare` that handles COCO;
3. trains the `shapes` preset with Ray Train on two CPU workers (DDP), tracked in a local MLflow;
4. evaluates the registered model on the held-out val split (greedy exact match, probe accuracy,
   the log's metrics) and prints the table;
5. writes OUT/LAST_RUN.json (model URI, data folder, a held-out image) for `python -m serve.demo`.

Everything lands under OUT: data, Ray Train checkpoints, the MLflow database and artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEMO_PER_CLASS = 400  # train images per class: 7,200 images (at 200, 1-2% of held-out shapes stayed wrong)
DEMO_VAL_PER_CLASS = 10  # held-out images per class: 180 images
DEMO_IMAGE_SIZE = 32  # stored side = the preset's model.image_size: no resize at training time


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="folder for data, checkpoints and MLflow (default demo_out)")
    parser.add_argument("--epochs", type=int, default=None, help="override the shapes preset's epochs")
    parser.add_argument("--per-class", type=int, default=DEMO_PER_CLASS, help="train images per class (18 classes)")
    parser.add_argument("--val-per-class", type=int, default=DEMO_VAL_PER_CLASS)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (CPU)")
    parser.add_argument("--verbose", action="store_true", help="show library and worker output here too")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from jobs import console

    console.setup("demo", verbose=args.verbose, log_dir=out / "logs")

    # The demo's own MLflow store, unless the user points elsewhere.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    from jobs import make_shapes, prepare
    from jobs.runtime import ensure_ray
    from jobs.tracking import resolve_tracking_uri, ui_command
    from jobs.train import check_cluster, run_training
    from model.checkpoint import CHECKPOINT_FILE
    from model.config import load_config

    _step(f"starting Ray: {ensure_ray()}")
    if not args.verbose and console.ray_logs():
        console.detail("worker logs", console.ray_logs())

    raw, data = out / "shapes", out / "shapes-prepared"
    _step(f"generating the synthetic shapes set ({args.per_class} train + {args.val_per_class} val images per class)")
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    shapes_args = ["--out", str(raw), "--per-class", str(args.per_class), "--val-per-class", str(args.val_per_class)]
    _check(make_shapes.main([*shapes_args, "--image-size", str(DEMO_IMAGE_SIZE)]), "make_shapes")
    for split in ("train", "val"):
        _step(f"preparing {split} to Parquet")
        prep = ["--coco-root", str(raw), "--split", split, "--out", str(data), "--image-format", "png"]
        _check(prepare.main([*prep, "--image-size", str(DEMO_IMAGE_SIZE)]), f"prepare {split}")

    overrides = [f"--train.num_workers={args.workers}", f"--train.storage_path={out / 'runs'}"]
    if args.epochs:
        overrides.append(f"--train.epochs={args.epochs}")
    cfg = load_config("shapes", overrides)
    check_cluster(cfg)  # Ray was started above: run_training checks the data once and trains
    _step(f"training the shapes preset: {cfg.train.epochs} epochs on {cfg.train.num_workers} CPU workers (Ray Train)")
    with console.training_progress(cfg.train.epochs) as callbacks:
        run_name = f"shapes-demo-{time.strftime('%Y%m%d-%H%M%S')}"
        result = run_training(cfg, str(data), run_name=run_name, callbacks=callbacks, ray_ready=True)
    if result.model_uri is None:
        print("demo: training finished but no model was registered", file=sys.stderr)
        return 1

    _step(f"evaluating {result.alias_uri} on the held-out val split")
    evaluate_model = _evaluate_model()
    report = evaluate_model(result.alias_uri, str(data), split="val", report=str(out / "eval_report.json"))
    print(report["markdown"])

    held_out = _held_out_image(raw)
    last = {
        "model_uri": result.alias_uri,
        "model_version_uri": result.model_uri,
        "checkpoint": str(Path(result.checkpoint_dir or "") / CHECKPOINT_FILE),
        "tracking_uri": resolve_tracking_uri(),
        "data_dir": str(data),
        "raw_dir": str(raw),
        "held_out_image": str(held_out) if held_out else None,
        "exact_match_pct": report.get("exact_match_pct"),
        "probe_accuracy": report.get("probe_accuracy"),
        "mlflow_run_id": result.mlflow_run_id,
    }
    (out / "LAST_RUN.json").write_text(json.dumps(last, indent=2) + "\n")

    exact, probe_acc = report.get("exact_match_pct"), report.get("probe_accuracy")
    print()
    print(f"held-out exact greedy captions: {_pct(exact)}   (the log's Run 0: 100%)")
    print(f"held-out probe accuracy:        {_pct(probe_acc, scale=100)}   (18 classes, chance 5.6%)")
    print(f"registered model:               {result.alias_uri}  ({result.model_uri})")
    print(f"best checkpoint:                {result.checkpoint_dir}")
    print(f"report:                         {out / 'eval_report.json'} (+ .md)")
    print(f"see the runs:                   {ui_command(resolve_tracking_uri())}")
    print(f"log:                            {console.log_file()}")
    print(
        f"demo took {time.perf_counter() - started:.0f} s; next: python -m serve.demo (reads {out / 'LAST_RUN.json'})"
    )
    return 0


def _evaluate_model():
    """jobs.evaluate.evaluate_model (imported late: it is the heaviest import)."""
    from jobs.evaluate import evaluate_model

    return evaluate_model


def _held_out_image(raw: Path) -> Path | None:
    images = sorted((raw / "val").glob("*.png"))
    return images[0] if images else None


def _pct(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.1f}%"


def _step(text: str) -> None:
    from jobs.console import step

    step(text)


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"demo: {what} failed with exit code {code}")


if __name__ == "__main__":
    sys.exit(main())
