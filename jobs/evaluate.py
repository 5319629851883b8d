"""Evaluate a trained captioner: the research log's metrics, BLEU-4 / CIDEr-D, collapse and the probe.

    python -m jobs.evaluate --model runs/shapes/model.safetensors --data data/shapes-prepared
    python -m jobs.evaluate --model models:/vl-jepa-captioner@champion --data DIR --report eval.json

The model is a checkpoint file or folder, or an MLflow `models:/` / `runs:/` URI; the data is a
prepared root (`prepare` writes ROOT/<split>/). Each image of the split is encoded once; its plan
feeds everything else:

    images (N, 3, S, S) -> plans (N, P, D) -> greedy captions      (KV-cached generation)
                                           -> sampled captions     (t = 0.7, fixed seed)
                                           -> teacher-forced CE    (all references)
                                           -> mean-pooled plan -> linear probe (jobs.probe)

The report is a flat JSON dict plus a Markdown table beside it (FILE with .md). Inside an active
MLflow run, or with --mlflow-run-id, both files and the numeric metrics are logged to that run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from torch import Tensor

from jobs import caption_metrics, probe, scene_metrics
from jobs.checkpoints import resolve_checkpoint, resolve_tracking_uri
from jobs.dataset import DataError, EvalSet, load_eval_split, load_split, split_exists
from jobs.scene_grammar import read_spec
from model.checkpoint import load_model
from model.codec import plan_nbytes
from model.config import Config
from model.generation import generate
from model.model import ENCODE_BATCH_SIZE, VLJEPA
from model.objectives import references_ce
from model.tokenizer import ByteTokenizer

SAMPLE_TEMPERATURE = 0.7  # the log's sampled setting
SAMPLE_SEED = 0
PROBE_SEED = 0
PROBE_TRAIN_IMAGES = 5000  # cap on train-split images the probe learns from
REPORT_SAMPLES = 10  # example captions kept in the report

# The log's Run 2 (baseline seed config, 2,000 test images), for the comparison column.
LOG_RUN2: dict[str, str] = {
    "final_ce": "1.0619",
    "greedy_unique_pct": "0.05% (1/2000)",
    "sampled_unique_pct": "93.45% (1869/2000)",
    "sampled_content_match_pct": "7.1%",
    "unique_words": "13 / - / 2776",
    "probe_keyword": "32.1% / 5.0%",
    "plan_bytes": "8192 (16 x 256)",
}


# ---------------------------------------------------------------------------
# Model outputs over a split


def encode_plans(model: VLJEPA, images: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
    """(N, 3, S, S) -> (N, P, D) float32 on the CPU, through the model's one inference forward."""
    return model.encoder.encode(images, batch_size=batch_size).float().cpu()


@torch.no_grad()
def caption_plans(
    model: VLJEPA,
    plans: Tensor,
    tokenizer: ByteTokenizer,
    *,
    batch_size: int,
    device: torch.device,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """Decode captions from plans (N, P, D); sampling uses one seeded generator for the whole split."""
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    max_new = model.cfg.max_seq_length - 1  # BOS takes the first text position
    captions: list[str] = []
    for i in range(0, len(plans), batch_size):
        ids = generate(
            model.decoder,
            plans[i : i + batch_size].to(device),
            max_new_tokens=max_new,
            temperature=temperature,
            generator=generator,
        )
        captions.extend(tokenizer.decode_batch(ids.cpu()))
    return captions


# ---------------------------------------------------------------------------
# The probe: which plans it learns from and what labels it predicts


def load_eval_data(data_dir: str, split: str, cfg: Config, *, limit: int = 0) -> tuple[EvalSet, float]:
    """The evaluated images, and the fraction of the train split they are (0 for a split folder of its own).

    Without a ROOT/<val_split> folder, asking for the config's val split gives what training held
    out as validation: the `data.val_fraction` of the train split picked by `heldout_mask`.
    """
    size = cfg.model.image_size
    if split != cfg.data.val_split or split_exists(data_dir, split):
        return load_split(data_dir, split, size, limit=limit), 0.0  # raises DataError naming the folder
    data = load_eval_split(data_dir, cfg, limit=limit)
    if data is None:
        raise DataError(f"{data_dir} has no {split!r} split and data.val_fraction is 0: nothing held out to evaluate")
    return data, cfg.data.val_fraction


def _probe_sets(
    model: VLJEPA,
    data_dir: str,
    split: str,
    heldout_fraction: float,
    train_split: str,
    eval_plans: Tensor,
    eval_set: EvalSet,
    probe_split: str,
    *,
    batch_size: int,
    device: torch.device,
) -> tuple[Tensor, _Labels, Tensor, _Labels, str]:
    """(train pooled plans, train labels, test pooled plans, test labels, how they were chosen).

    The probe learns from `probe_split` (capped; minus the held-out rows when the evaluated set is
    the held-out part of it) and is scored on the evaluated set; when there is no other split to
    learn from, the evaluated set is cut 50/50 by a seeded permutation.
    """
    pooled = probe.pool_plans(eval_plans)  # (N, D)
    size, cap = model.cfg.image_size, PROBE_TRAIN_IMAGES
    train_set, how = None, ""
    if heldout_fraction > 0 and probe_split == train_split:
        train_set = load_split(data_dir, probe_split, size, limit=cap, heldout=(heldout_fraction, False))
        how = f"trained on {probe_split!r} minus its held-out {heldout_fraction:g}"
    elif probe_split != split and split_exists(data_dir, probe_split):
        train_set = load_split(data_dir, probe_split, size, limit=cap)
        how = f"trained on {probe_split!r}"
    if train_set is not None and len(train_set):
        train_pooled = probe.pool_plans(encode_plans(model, train_set.images, batch_size=batch_size))
        return train_pooled, _Labels.of(train_set), pooled, _Labels.of(eval_set), f"{how} ({len(train_set)} images)"
    perm = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(PROBE_SEED)).tolist()
    half = len(perm) // 2
    labels = _Labels.of(eval_set)
    return (
        pooled[perm[:half]],
        labels.subset(perm[:half]),
        pooled[perm[half:]],
        labels.subset(perm[half:]),
        f"50/50 split of the evaluated {split!r} images",
    )


class _Labels:
    """Per-image probe targets: reference captions and instance category ids."""

    def __init__(self, captions: list[list[str]], category_ids: list[list[int]]):
        self.captions, self.category_ids = captions, category_ids

    @classmethod
    def of(cls, data: Any) -> _Labels:
        return cls(list(data.captions), [list(c) for c in data.category_ids])

    def subset(self, index: Sequence[int]) -> _Labels:
        return _Labels([self.captions[i] for i in index], [self.category_ids[i] for i in index])


def _single_label(x: Tensor, labels: Sequence[int | None]) -> tuple[Tensor, list[int]]:
    keep = [i for i, label in enumerate(labels) if label is not None]
    return x[keep], [labels[i] for i in keep]


def _single_label_probe(
    name: str, train_x: Tensor, test_x: Tensor, train_labels: Sequence[int | None], test_labels: Sequence[int | None]
) -> dict[str, Any]:
    """`probe_<name>_*` metrics of a linear probe on the labelled images; empty when there is nothing to learn."""
    (x_train, y_train), (x_test, y_test) = _single_label(train_x, train_labels), _single_label(test_x, test_labels)
    if len(set(y_train)) < 2 or not y_test:
        return {}
    r = probe.single_label_probe(x_train, y_train, x_test, y_test)
    fields = {
        "accuracy": r.accuracy,
        "chance": r.chance,
        "majority": r.majority,
        "classes": r.num_classes,
        "num_test": r.num_test,
    }
    return {f"probe_{name}_{key}": value for key, value in fields.items()}


def run_probes(train_x: Tensor, train: _Labels, test_x: Tensor, test: _Labels) -> dict[str, Any]:
    """Keyword probe (the log's 20 categories), category probe (single-label sets such as shapes)
    and multi-label mAP (COCO instances), each where its labels exist."""
    out: dict[str, Any] = {"probe_kind": "none", "probe_accuracy": None, "probe_chance": None, "probe_majority": None}
    if len(train_x) < 2 or len(test_x) < 1:
        return out  # too few images to learn anything (e.g. --max-images 1)
    keywords = (
        [caption_metrics.keyword_category(c) for c in train.captions],
        [caption_metrics.keyword_category(c) for c in test.captions],
    )
    out.update(_single_label_probe("keyword", train_x, test_x, *keywords))

    all_ids = train.category_ids + test.category_ids
    labelled = [ids for ids in all_ids if ids]
    if labelled and all(len(set(ids)) == 1 for ids in labelled):
        # one category per image (the synthetic shapes' 18 classes): a single-label probe
        categories = [[ids[0] if ids else None for ids in split.category_ids] for split in (train, test)]
        out.update(_single_label_probe("category", train_x, test_x, *categories))
    elif labelled:
        categories = sorted({c for ids in labelled for c in ids})
        r = probe.multilabel_probe(train_x, train.category_ids, test_x, test.category_ids, categories)
        out.update(probe_map80=r.map, probe_map80_categories=r.num_categories, probe_map80_prevalence=r.prevalence_map)

    # The headline probe figure: the category probe where categories are single-label, else the log's keywords.
    kind = "category" if "probe_category_accuracy" in out else "keyword" if "probe_keyword_accuracy" in out else None
    out["probe_kind"] = kind or "none"
    out["probe_accuracy"] = out[f"probe_{kind}_accuracy"] if kind else None
    out["probe_chance"] = out[f"probe_{kind}_chance"] if kind else None
    out["probe_majority"] = out[f"probe_{kind}_majority"] if kind else None
    return out


# ---------------------------------------------------------------------------
# The whole evaluation


def evaluate_model(
    source: str,
    data_dir: str,
    *,
    split: str = "val",
    report: str | None = None,
    max_images: int | None = None,
    probe_split: str | None = None,
    batch_size: int = ENCODE_BATCH_SIZE,
    device: str | None = None,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Evaluate one model on one prepared split; returns the flat report (also written to `report`)."""
    started = time.perf_counter()
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_checkpoint(source)  # the same rule as serve: jobs/checkpoints.py
    try:
        loaded = load_model(resolved.path, map_location=dev)
    finally:
        resolved.release()
    checkpoint = resolved.path if resolved.download_dir is None else f"{source} (version {resolved.version})"
    model, cfg = loaded.model.eval(), loaded.config
    data, heldout_fraction = load_eval_data(data_dir, split, cfg, limit=max_images or 0)
    if len(data.image_ids) == 0:
        raise ValueError(f"split {split!r} of {data_dir} has no images to evaluate")
    tokenizer = ByteTokenizer(cfg.model.max_seq_length)
    references = [list(refs) for refs in data.captions]

    plans = encode_plans(model, data.images, batch_size=batch_size)  # (N, P, D)
    greedy = caption_plans(model, plans, tokenizer, batch_size=batch_size, device=dev)
    sampled = caption_plans(
        model, plans, tokenizer, batch_size=batch_size, device=dev, temperature=SAMPLE_TEMPERATURE, seed=SAMPLE_SEED
    )
    # The one CE home (model.objectives), as train-time val_ce; the log's "final CE" was the training
    # loss, i.e. with label smoothing: the second value.
    ce, ce_smoothed = references_ce(
        model.decoder,
        plans,
        references,
        max_chars=cfg.data.max_caption_chars,
        label_smoothing=(0.0, cfg.objective.label_smoothing),
    )

    metrics: dict[str, Any] = {
        "source": source,
        "checkpoint": str(checkpoint),
        "fingerprint": loaded.fingerprint,
        "preset": cfg.preset,
        "conditioning": cfg.model.conditioning,
        "bottleneck": cfg.model.bottleneck,
        "split": split,
        "final_ce": ce,
        "final_ce_smoothed": ce_smoothed,
        "plan_len": cfg.model.plan_len,
        "embed_dim": cfg.model.embed_dim,
        "plan_dim": cfg.model.plan_dim,  # the width on the wire: D, or model.wire_dim when set
        "plan_bytes": plan_nbytes(cfg.model.plan_len, cfg.model.plan_dim, "fp16"),  # K x D_wire payload
    }
    metrics.update(caption_metrics.caption_report(greedy, references, sampled))
    scene_spec = read_spec(data_dir)  # a scenes set keeps its spec beside the shards; COCO has none
    if scene_spec is not None:
        metrics.update(scene_metrics.scene_report(greedy, references, scene_spec))

    train_x, train_labels, test_x, test_labels, how = _probe_sets(
        model,
        data_dir,
        split,
        heldout_fraction,
        cfg.data.train_split,
        plans,
        data,
        probe_split or cfg.data.train_split,
        batch_size=batch_size,
        device=dev,
    )
    metrics["probe_setup"] = how
    metrics.update(run_probes(train_x, train_labels, test_x, test_labels))
    metrics["samples"] = [
        {"image_id": int(data.image_ids[i]), "greedy": greedy[i], "sampled": sampled[i], "references": references[i]}
        for i in range(min(REPORT_SAMPLES, len(greedy)))
    ]
    metrics["eval_seconds"] = time.perf_counter() - started
    # NaN (no tokens, no positives) is not JSON: such figures are reported as null
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    metrics["markdown"] = markdown_table(metrics)

    if report:
        json_path, md_path = write_report(metrics, report)
        log_to_mlflow(metrics, [json_path, md_path], run_id=mlflow_run_id)
    elif mlflow_run_id:
        log_to_mlflow(metrics, [], run_id=mlflow_run_id)
    return metrics


# ---------------------------------------------------------------------------
# Report files and MLflow


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct_pair(accuracy: float | None, chance: float | None) -> str:
    if accuracy is None or chance is None:
        return "n/a"
    return f"{100 * accuracy:.1f}% / {100 * chance:.1f}%"


def markdown_table(m: dict[str, Any]) -> str:
    """The log's comparison table for this model, with Run 2's figures beside it."""
    n, log = m["num_images"], LOG_RUN2
    words = f"{m['greedy_unique_words']} / {m['sampled_unique_words']} / {m['reference_unique_words']}"
    lengths = f"{_fmt(m['greedy_avg_length'], 1)} / {_fmt(m['reference_avg_length'], 1)}"
    keyword = _pct_pair(m.get("probe_keyword_accuracy"), m.get("probe_keyword_chance"))
    category = _pct_pair(m.get("probe_category_accuracy"), m.get("probe_category_chance"))
    rows = [
        ("Final CE (label smoothing)", _fmt(m["final_ce_smoothed"], 4), log["final_ce"]),
        ("Final CE (plain)", _fmt(m["final_ce"], 4), ""),
        ("Greedy unique", f"{_fmt(m['greedy_unique_pct'])}% ({m['greedy_unique']}/{n})", log["greedy_unique_pct"]),
        (
            "Sampled unique (t=0.7)",
            f"{_fmt(m['sampled_unique_pct'])}% ({m['sampled_unique']}/{n})",
            log["sampled_unique_pct"],
        ),
        ("Greedy content match", f"{_fmt(m['greedy_content_match_pct'])}%", ""),
        ("Sampled content match", f"{_fmt(m['sampled_content_match_pct'])}%", log["sampled_content_match_pct"]),
        ("Unique words: greedy / sampled / references", words, log["unique_words"]),
        ("Average length (words): greedy / references", lengths, ""),
        ("Greedy word overlap", f"{_fmt(m['greedy_word_overlap_pct'])}%", ""),
        ("Exact match (greedy)", f"{_fmt(m['exact_match_pct'])}%", ""),
        ("BLEU-4", _fmt(m["bleu4"], 4), ""),
        ("CIDEr-D", _fmt(m["cider_d"], 4), ""),
        ("Collapse verdict", m["collapse_verdict"], "collapsed"),
        ("Probe: 20 keyword categories, accuracy / chance", keyword, log["probe_keyword"]),
        ("Probe: single-label categories, accuracy / chance", category, ""),
        ("Probe: instance categories, multi-label mAP", _fmt(m.get("probe_map80"), 4), ""),
        ("Plan size (fp16 bytes)", f"{m['plan_bytes']} ({m['plan_len']} x {m['plan_dim']})", log["plan_bytes"]),
    ]
    title = f"### `{m['preset']}` ({m['conditioning']}, fingerprint {m['fingerprint']}) on {m['split']!r}, {n} images"
    lines = [title, "", "| Metric | This model | Log Run 2 |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {ref} |" for name, value, ref in rows]
    lines += ["", f"Probe: {m['probe_setup']}; headline probe = {m['probe_kind']}."]
    if "scene_exact_pct" in m:  # a scenes set: the caption scored attribute by attribute
        accs = ", ".join(f"{k} {_fmt(m[f'scene_{k}_acc'], 1)}%" for k in ("count", *scene_metrics.ATTRIBUTES, "object"))
        bits = f"{_fmt(m['scene_bits_recovered'])} of {_fmt(m['scene_bits_per_image'])} bits per image"
        lines += ["", f"Scenes: exact {_fmt(m['scene_exact_pct'], 1)}%, {accs}; {bits} recovered."]
    return "\n".join(lines) + "\n"


def write_report(metrics: dict[str, Any], report: str) -> tuple[Path, Path]:
    """FILE (JSON) and FILE with .md (the Markdown table); returns both paths."""
    json_path = Path(report)
    md_path = json_path.with_suffix(".md")
    if md_path == json_path:
        raise ValueError(f"--report {report}: give the JSON path; the Markdown table goes beside it as .md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    md_path.write_text(metrics["markdown"])
    return json_path, md_path


def log_to_mlflow(metrics: dict[str, Any], files: Sequence[Path], *, run_id: str | None = None) -> str | None:
    """Log numeric metrics (as eval/NAME) and the report files to `run_id` or the active run; else no-op."""
    import mlflow
    from mlflow import MlflowClient

    active = mlflow.active_run()
    if run_id is None and active is None:
        return None
    if run_id is None:
        run_id, tracking_uri = active.info.run_id, mlflow.get_tracking_uri()
    else:
        tracking_uri = mlflow.get_tracking_uri() if active is not None else resolve_tracking_uri()
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    values = [
        mlflow.entities.Metric(f"eval/{key}", float(value), now, 0)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ]
    for start in range(0, len(values), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=values[start : start + 1000])
    client.set_tag(run_id, "eval.collapse", metrics["collapse_verdict"])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="eval")
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint file or folder, or a models:/ or runs:/ URI")
    parser.add_argument("--data", required=True, help="prepared data root (holds one folder per split)")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument(
        "--report", default="eval_report.json", help="JSON report path; the table goes beside it as .md"
    )
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=int, default=ENCODE_BATCH_SIZE)
    parser.add_argument(
        "--probe-split", default=None, help="split the probe learns from (default: the config's train split)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--mlflow-run-id", default=None, help="also log the report into this MLflow run")
    parser.add_argument("--verbose", action="store_true", help="show library output here too")
    args = parser.parse_args(argv)
    from jobs import console

    console.setup_once("evaluate", verbose=args.verbose)
    console.step(f"evaluating {args.model} on the {args.split} split of {args.data}")
    try:
        metrics = evaluate_model(
            args.model,
            args.data,
            split=args.split,
            report=args.report,
            max_images=args.max_images,
            probe_split=args.probe_split,
            batch_size=args.batch_size,
            device=args.device,
            mlflow_run_id=args.mlflow_run_id,
        )
    except (FileNotFoundError, ValueError, DataError, MlflowException) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(metrics["markdown"])
    print(f"report: {args.report} and {Path(args.report).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
