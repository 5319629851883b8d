"""A finished sweep as a results table (CSV + Markdown), a plot of the metric against K, and where they go.

Rows are plain dicts: the swept values, a few always-shown config columns (conditioning, K,
bottleneck, plan length) and the metrics. The table and plot need no Ray, so a report can be
rebuilt from `rows.json` at any time; `publish` also logs them to the sweep's parent MLflow run
and registers the best trial's model (the only one registered).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobs.sweep_spaces import Space

# A scenes set's per-attribute scores (jobs/scene_metrics.py); shown only when the trials have them.
SCENE_COLUMNS = (
    "sampled_unique_pct",
    "scene_exact_pct",
    "scene_bits_recovered",
    "scene_bits_recovered_pct",
    "scene_count_acc",
    "scene_colour_acc",
    "scene_shape_acc",
    "scene_size_acc",
    "scene_position_acc",
    "scene_object_acc",
)
# Always shown, whatever was swept: the columns that answer the log's question.
CONFIG_COLUMNS = ("conditioning", "K", "bottleneck", "plan_len", "embed_dim", "image_size")
METRIC_COLUMNS = (
    "val_ce",
    "final_ce",
    "greedy_unique_pct",
    "exact_match_pct",
    "cider_d",
    "probe_accuracy",
    "plan_bytes",
    "epochs",
    "status",
    *SCENE_COLUMNS,
)
# Higher is better for these; everything else (losses) is minimised.
MAXIMIZE = {"greedy_unique_pct", "exact_match_pct", "cider_d", "bleu4", "probe_accuracy", *SCENE_COLUMNS}


def default_mode(metric: str) -> str:
    return "max" if metric in MAXIMIZE else "min"


def columns(rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> list[str]:
    """Table columns: trial, swept keys (short names), config columns, metrics present in any row."""
    present = {k for row in rows for k in row}
    out = ["trial"] + [k for k in swept if k in present]
    out += [c for c in CONFIG_COLUMNS if c in present and c not in out and _short_key(c) not in map(_short_key, out)]
    out += [m for m in METRIC_COLUMNS if m in present]
    return out


def _short_key(key: str) -> str:
    aliases = {"num_latent_vectors": "K"}
    tail = key.rsplit(".", 1)[-1]
    return aliases.get(tail, tail)


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_row(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best finished row by `metric` (rows without a finite value never win)."""
    scored = [r for r in rows if _finite(r.get(metric)) and r.get("status") == "completed"]
    if not scored:
        scored = [r for r in rows if _finite(r.get(metric))]
    if not scored:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(scored, key=lambda r: sign * float(r[metric]))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in cols})


def markdown(
    rows: Sequence[dict[str, Any]],
    cols: Sequence[str],
    *,
    title: str,
    metric: str,
    mode: str,
    best: dict[str, Any] | None,
    notes: Sequence[str] = (),
) -> str:
    """The results table with the best trial marked, plus a short header."""
    lines = [f"# {title}", ""]
    lines.append(f"{len(rows)} trials; ranked by `{metric}` ({mode}). Best trial marked **best**.")
    lines.append("")
    lines.append("| " + " | ".join(_short_key(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        cells = [fmt(row.get(c)) for c in cols]
        if best is not None and row.get("trial") == best.get("trial"):
            cells[0] = f"**best** {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best: trial `{best['trial']}`, {metric} = {fmt(best.get(metric))}."]
        if best.get("registered_model"):
            lines.append(f"Registered as `{best['registered_model']}`.")
    if any(row.get("bottleneck") == "none" for row in rows):
        lines.append("K is `-` where bottleneck = none: the decoder reads all `plan_len` patch features.")
    lines += [f"- {n}" for n in notes] if notes else []
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: Sequence[dict[str, Any]], *, metric: str, title: str) -> bool:
    """`metric` against K, one line per conditioning; no-bottleneck trials as dashed levels.

    Several trials at the same (conditioning, K) (other swept axes) are averaged, with their spread
    as an error bar. Returns False when no row has the metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in rows if _finite(r.get(metric))]
    if not usable:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    conditionings = sorted({str(r.get("conditioning")) for r in usable})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cond in enumerate(conditionings):
        color = colors[i % len(colors)]
        mine = [r for r in usable if str(r.get("conditioning")) == cond]
        planned = [r for r in mine if r.get("bottleneck", "plan") == "plan"]
        ks = sorted({int(r["K"]) for r in planned})
        if ks:
            means, spreads = [], []
            for k in ks:
                vals = [float(r[metric]) for r in planned if int(r["K"]) == k]
                means.append(sum(vals) / len(vals))
                spreads.append((max(vals) - min(vals)) / 2)
            ax.errorbar(ks, means, yerr=spreads, marker="o", capsize=3, color=color, label=cond)
        flat = [float(r[metric]) for r in mine if r.get("bottleneck") == "none"]
        if flat:
            ax.axhline(sum(flat) / len(flat), linestyle="--", color=color, label=f"{cond}, no bottleneck")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (latent plan vectors)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# Publishing: files, the parent MLflow run, the one registered model


def publish(
    rows: list[dict[str, Any]],
    *,
    space: Space,
    experiment: str,
    meta: dict[str, Any],
    metric: str,
    mode: str,
    notes: Sequence[str],
) -> int:
    """Table (CSV + Markdown) + plot in EXPERIMENT/report, best trial registered, all on the parent run."""
    out = Path(experiment) / "report" if "://" not in experiment else Path("sweeps") / meta["name"] / "report"
    out.mkdir(parents=True, exist_ok=True)
    best = best_row(rows, metric, mode)
    registered = register_best(best, meta) if best is not None else None
    if best is not None and registered:
        best["registered_model"] = registered
    notes = [
        *notes,
        *(
            f"trial {r['trial']}: {r.get('error') or r['eval_error']}"
            for r in rows
            if r.get("error") or r.get("eval_error")
        ),
    ]
    cols = columns(rows, space.axes)
    title = f"Sweep {meta['name']}: {space.name}"
    (out / "rows.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    write_csv(out / "results.csv", rows, cols)
    md = markdown(rows, cols, title=title, metric=metric, mode=mode, best=best, notes=notes)
    (out / "results.md").write_text(md)
    plotted = plot(out / "plot.png", rows, metric=metric, title=title)
    print(md)
    print(f"sweep: report in {out}" + ("" if plotted else f" (no plot: no trial has {metric})"))
    _log_parent(meta, out, rows, best, metric)
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        print(f"sweep: {len(failed)} trial(s) failed: {', '.join(str(r['trial']) for r in failed)}", file=sys.stderr)
    return 1 if len(failed) == len(rows) else 0


def register_best(best: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Register the best trial's checkpoint (and only it) under the config's registered model."""
    run_id, uri = best.get("mlflow_run_id"), best.get("tracking_uri") or meta.get("tracking_uri")
    if not run_id or not uri or not best.get("checkpoint"):
        return None
    from jobs.tracking import CHECKPOINT_FILE, log_and_register
    from model.checkpoint import read_config

    folder = Path(best["checkpoint"])
    cfg = read_config(folder / CHECKPOINT_FILE)
    registered = log_and_register(cfg, uri, run_id, folder, {k: v for k, v in best.items() if _scalar(v)})
    return registered.alias_uri if registered else None


def _log_parent(
    meta: dict[str, Any], folder: Path, rows: Sequence[dict[str, Any]], best: dict[str, Any] | None, metric: str
) -> None:
    if not meta.get("parent_run_id"):
        return
    from mlflow import MlflowClient

    client = MlflowClient(meta["tracking_uri"])
    run_id = meta["parent_run_id"]
    # Trials ASHA stopped were killed mid-fit: close their runs so they do not read as still running.
    for row in rows:
        if row.get("mlflow_run_id") and str(row.get("status")).startswith("stopped"):
            client.set_terminated(row["mlflow_run_id"], status="KILLED")
    for path in sorted(folder.iterdir()):
        client.log_artifact(run_id, str(path), artifact_path="report")
    if best is not None:
        client.set_tag(run_id, "sweep.best_trial", str(best["trial"]))
        for key in ("val_ce", "final_ce", "greedy_unique_pct", "cider_d", "probe_accuracy", metric):
            value = best.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(run_id, f"best_{key}", float(value))
    client.set_terminated(run_id, status="FINISHED")


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None
