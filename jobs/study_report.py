"""The bottleneck study's report: arms, the verdict by written rules, the Markdown and the plots.

Needs no Ray: `python -m jobs.study` feeds it the sweep's rows, and a report can be rebuilt from
`rows.json` at any time (`summarise` -> `verdict` -> `markdown` / `plots`).

An arm is one recipe (bottleneck, K, features); its seeds are averaged and their spread (max - min)
shown. Features: "scratch" (captioning loss only, the log's recipe), "category" (+ the category loss
on the pooled plan), "infonce" (+ InfoNCE), "frozen" (a pretrained vision encoder, frozen).

The verdict (thresholds are module constants, printed in the report). S = the study's score
(default: % of each image's bits the greedy caption recovers), control = the best no-bottleneck arm,
plan@K = the scratch plan arm at the log's K (16), best@K = the best other-features arm at that K:

    feature-limited       control < CONTROL_FLOOR                              (nothing reads the image well)
    not limited           control - plan@K <= NOT_LIMITED_GAP                  (the plan keeps up)
    trainability-limited  best@K closes the gap to within CLOSED_GAP of the control, and the scratch
                          plan is flat across K (max - min < RISE)
    capacity-limited      the scratch plan rises with K (S(K max) - S(K min) >= RISE) and no
                          other-features arm at K closes the gap
    mixed / inconclusive  anything else (e.g. a better recipe closes the gap AND K matters), said so
A gap or rise smaller than the largest seed spread seen is flagged as within seed noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTROL_FLOOR = 50.0  # % of bits: below this, even reading every patch fails: the features are the limit
NOT_LIMITED_GAP = 5.0  # points: the plan at the log's K this close to the control is "not limited"
CLOSED_GAP = 10.0  # points: an aux-objective / frozen arm this close to the control "closes the gap"
RISE = 10.0  # points: the scratch plan's gain from the smallest to the largest K that counts as "rises"
LOG_K = 16

SCENE_ATTRS = ("count", "colour", "shape", "size", "position", "object")
COLLAPSE_COLS = ("greedy_unique_pct", "sampled_unique_pct", "collapse_verdict", "final_ce", "probe_accuracy")


def features_of(row: dict[str, Any]) -> str:
    if row.get("model.vision_backbone", "scratch") == "frozen":
        return "frozen"
    if float(row.get("objective.category_weight") or 0) > 0:
        return "category"
    if float(row.get("objective.infonce_weight") or 0) > 0:
        return "infonce"
    return "scratch"


def arm_of(row: dict[str, Any]) -> str:
    """`K16/scratch`, `none/frozen`, ..."""
    bottleneck = row.get("bottleneck") or row.get("model.bottleneck", "plan")
    where = "none" if bottleneck == "none" else f"K{row.get('K') or row.get('model.num_latent_vectors')}"
    return f"{where}/{features_of(row)}"


@dataclass
class Arm:
    name: str
    bottleneck: str
    K: int | None
    features: str
    plan_bits: int  # on the wire: plan_len x D fp16 values x 16 bits
    rows: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.rows if _finite(r.get(key))]

    def mean(self, key: str) -> float | None:
        vals = self.values(key)
        return sum(vals) / len(vals) if vals else None

    def spread(self, key: str) -> float | None:
        vals = self.values(key)
        return max(vals) - min(vals) if len(vals) > 1 else None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def summarise(rows: Sequence[dict[str, Any]]) -> list[Arm]:
    """Rows grouped into arms, ordered: controls, then plans by K, scratch first."""
    arms: dict[str, Arm] = {}
    for row in rows:
        name = arm_of(row)
        if name not in arms:
            bottleneck = "none" if name.startswith("none") else "plan"
            plan_len = int(row.get("plan_len") or 0)
            arms[name] = Arm(
                name,
                bottleneck,
                None if bottleneck == "none" else int(row.get("K") or row.get("model.num_latent_vectors")),
                features_of(row),
                plan_len * int(row.get("embed_dim") or 0) * 16,
            )
        arms[name].rows.append(row)
    order = {"scratch": 0, "category": 1, "infonce": 2, "frozen": 3}
    return sorted(arms.values(), key=lambda a: (a.bottleneck == "plan", a.K or 0, order.get(a.features, 9)))


@dataclass
class Verdict:
    label: str
    reasons: list[str]
    evidence: list[str]  # arm names the verdict rests on
    noise: float  # the largest seed spread of the score


def verdict(arms: Sequence[Arm], metric: str, log_k: int = LOG_K) -> Verdict:
    """Apply the module docstring's rules to the arms' mean `metric`."""
    spreads = [s for a in arms if (s := a.spread(metric)) is not None]
    noise = max(spreads) if spreads else 0.0
    scored = {a.name: a.mean(metric) for a in arms if a.mean(metric) is not None}
    controls = [a for a in arms if a.bottleneck == "none" and a.name in scored]
    if not controls:
        return Verdict("inconclusive", ["no no-bottleneck control finished"], [], noise)
    control = max(controls, key=lambda a: scored[a.name])
    c = scored[control.name]
    ks = sorted({a.K for a in arms if a.bottleneck == "plan" and a.features == "scratch" and a.name in scored})
    k = log_k if log_k in ks else (min(ks, key=lambda x: abs(x - log_k)) if ks else None)
    if c < CONTROL_FLOOR:
        return Verdict(
            "feature-limited",
            [f"control {control.name} recovers {c:.1f} < CONTROL_FLOOR {CONTROL_FLOOR:g}"],
            [control.name],
            noise,
        )
    if k is None:
        return Verdict("inconclusive", ["no scratch plan arm finished"], [control.name], noise)
    plan = f"K{k}/scratch"
    p = scored[plan]
    gap = c - p
    reasons = [f"control {control.name} = {c:.1f}; {plan} = {p:.1f}; gap {gap:.1f} points"]
    if gap <= NOT_LIMITED_GAP:
        reasons.append(f"gap <= NOT_LIMITED_GAP {NOT_LIMITED_GAP:g}")
        return Verdict("not limited", reasons, [control.name, plan], noise)
    lo, hi = f"K{ks[0]}/scratch", f"K{ks[-1]}/scratch"
    rise = scored[hi] - scored[lo]
    rises = len(ks) > 1 and rise >= RISE
    reasons.append(f"scratch plan {lo} -> {hi}: {scored[lo]:.1f} -> {scored[hi]:.1f} ({rise:+.1f}; RISE {RISE:g})")
    others = [a for a in arms if a.bottleneck == "plan" and k == a.K and a.features != "scratch" and a.name in scored]
    best = max(others, key=lambda a: scored[a.name]) if others else None
    closes = best is not None and c - scored[best.name] <= CLOSED_GAP
    if best is not None:
        reasons.append(
            f"best other features at K{k}: {best.name} = {scored[best.name]:.1f} "
            f"({'closes' if closes else 'does not close'} the gap: CLOSED_GAP {CLOSED_GAP:g})"
        )
    evidence = [control.name, plan, lo, hi] + ([best.name] if best else [])
    if noise and (gap <= noise or (rises and rise <= noise)):
        reasons.append(f"warning: a deciding difference is within the seed spread ({noise:.1f} points)")
    evidence = list(dict.fromkeys(evidence))
    if closes and not rises:
        return Verdict("trainability-limited", reasons, evidence, noise)
    if rises and not closes:
        return Verdict("capacity-limited", reasons, evidence, noise)
    if closes and rises:
        reasons.append("a better recipe closes the gap at the same K, and K also matters: mostly trainability")
        return Verdict("mixed (trainability first)", reasons, evidence, noise)
    reasons.append("the plan is low and flat across K, and no other features close the gap at this budget")
    return Verdict("inconclusive", reasons, evidence, noise)


# ---------------------------------------------------------------------------
# Output


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _pm(arm: Arm, key: str) -> str:
    mean, spread = arm.mean(key), arm.spread(key)
    return _f(mean) + (f" ±{spread / 2:.1f}" if spread is not None else "")


def arm_table(arms: Sequence[Arm], metric: str, compo: bool) -> list[str]:
    head = ["arm", "seeds", "plan bits on wire", metric, "exact %", "bits recovered"]
    head += [f"{a} %" for a in SCENE_ATTRS]
    head += (["compo bits %", "compo exact %"] if compo else []) + ["greedy unique %", "collapse", "final CE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        cells = [f"`{a.name}`", str(len(a.rows)), f"{a.plan_bits:,}", _pm(a, metric)]
        cells += [_pm(a, "scene_exact_pct"), _f(a.mean("scene_bits_recovered"), 2)]
        cells += [_f(a.mean(f"scene_{k}_acc")) for k in SCENE_ATTRS]
        if compo:
            cells += [_pm(a, "compo_scene_bits_recovered_pct"), _f(a.mean("compo_scene_exact_pct"))]
        verdicts = sorted({str(r.get("collapse_verdict")) for r in a.rows})
        cells += [_f(a.mean("greedy_unique_pct")), "/".join(verdicts), _f(a.mean("final_ce"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(arms: Sequence[Arm], v: Verdict, *, metric: str, header: Sequence[str], compo: bool) -> str:
    lines = ["# Bottleneck study", "", *header, ""]
    lines += [f"**Verdict: {v.label}**", ""]
    lines += [f"- {r}" for r in v.reasons]
    lines += [f"- evidence rows: {', '.join(f'`{e}`' for e in v.evidence) or '-'}"]
    lines += [f"- largest seed spread of `{metric}`: {v.noise:.1f} points (± is half the spread over seeds)", ""]
    lines += ["## Arms", "", *arm_table(arms, metric, compo), ""]
    lines += [
        "## Rules",
        "",
        f"Thresholds: CONTROL_FLOOR = {CONTROL_FLOOR:g}, NOT_LIMITED_GAP = {NOT_LIMITED_GAP:g}, "
        f"CLOSED_GAP = {CLOSED_GAP:g}, RISE = {RISE:g} (points of `{metric}`); the log's K = {LOG_K}.",
        "",
        "- feature-limited: the best no-bottleneck control < CONTROL_FLOOR.",
        "- not limited: control - scratch plan at K <= NOT_LIMITED_GAP.",
        "- trainability-limited: an aux-objective or frozen-features arm at K is within CLOSED_GAP of the control "
        "and the scratch plan rises by < RISE from the smallest to the largest K.",
        "- capacity-limited: the scratch plan rises by >= RISE with K and no other arm at K closes the gap.",
        "- otherwise mixed / inconclusive (stated).",
        "",
        "Plan bits on the wire: plan rows x D x 16 (fp16). Bits recovered: the information of the attributes the "
        "greedy caption names right (jobs/scene_metrics.py). Collapse columns as in the research log.",
    ]
    return "\n".join(lines) + "\n"


def plots(folder: Path, arms: Sequence[Arm], metric: str, bits_per_image: float | None) -> list[Path]:
    """bits recovered vs plan bits on the wire, and per-attribute accuracy per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    key = "scene_bits_recovered" if any(a.mean("scene_bits_recovered") is not None for a in arms) else metric
    for features in dict.fromkeys(a.features for a in arms):
        mine = [a for a in arms if a.features == features and a.mean(key) is not None]
        plan = sorted((a for a in mine if a.bottleneck == "plan"), key=lambda a: a.plan_bits)
        if plan:
            ax.errorbar(
                [a.plan_bits for a in plan],
                [a.mean(key) for a in plan],
                yerr=[(a.spread(key) or 0) / 2 for a in plan],
                marker="o",
                capsize=3,
                label=f"plan, {features}",
            )
        for a in mine:
            if a.bottleneck == "none":
                ax.scatter([a.plan_bits], [a.mean(key)], marker="*", s=120, label=f"no bottleneck, {features}")
    if bits_per_image:
        ax.axhline(bits_per_image, linestyle="--", color="grey", label="bits per image")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("plan bits on the wire (rows x D x 16)")
    ax.set_ylabel("bits recovered per image" if key == "scene_bits_recovered" else metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(folder / "bits_vs_wire.png")
    fig.savefig(out[-1])
    plt.close(fig)

    present = [k for k in SCENE_ATTRS if any(a.mean(f"scene_{k}_acc") is not None for a in arms)]
    if present:
        fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=100)
        width = 0.8 / max(len(arms), 1)
        for i, a in enumerate(arms):
            xs = [j + i * width for j in range(len(present))]
            ax.bar(xs, [a.mean(f"scene_{k}_acc") or 0 for k in present], width=width, label=a.name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(present))], present)
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        out.append(folder / "attributes.png")
        fig.savefig(out[-1])
        plt.close(fig)
    return out
