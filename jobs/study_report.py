"""The bottleneck study's report: arms, the verdict by written rules, the Markdown and the plots.

Needs no Ray: `python -m jobs.study` feeds it the sweep's rows, and a report can be rebuilt from
`rows.json` at any time (`summarise` -> `verdict` -> `markdown` / `plots`).

An arm is one recipe (bottleneck, K, features); its seeds are averaged and their spread (max - min)
shown. Features: "scratch" (captioning loss only, the log's recipe), "category" (+ the category loss
on the pooled plan), "infonce" (+ InfoNCE), "frozen" (a pretrained vision encoder, frozen).

The verdict (thresholds are module constants, printed in the report). S = the study's score
(default: % of each image's bits the greedy caption recovers); control = the best no-bottleneck arm at
the standard recipe;
plan@K = the standard scratch plan at the log's K (16). A *lever* is any other arm at that K: the same
K x D plan on the wire, one thing changed: the objective (category / InfoNCE loss), the features
(frozen pretrained), the decoder's conditioning, the training budget (+Nep), or the plan former's
depth (+fusionN / +predN). A lever *closes* the gap when it is within CLOSED_GAP of its matched control
(the no-bottleneck arm with the same features at the same budget, else at the standard budget, else the
best control); its *gain* is its score minus
its base (the same arm at the standard budget for a +Nep arm, else plan@K). The scratch plan *rises*
when S(K max) - S(K min) >= RISE.

    feature-limited       control < CONTROL_FLOOR                          (nothing reads the image well)
    not limited           control - plan@K <= NOT_LIMITED_GAP              (the plan keeps up)
    mixed                 a lever closes the gap AND the plan rises with K
    trainability-limited  a training lever (objective, features, conditioning, budget) closes the gap;
                          the plan is flat across K
    plan-former-limited   only a deeper plan former closes the gap (the wire is enough, the pooling that
                          fills it is not); flat across K
    capacity-limited      the plan rises with K and no lever closes the gap
    trainability-limited (climbing, not closed)
                          nothing closes, flat across K, and every +Nep arm gains >= CLIMB over the same
                          recipe at the standard budget (beyond the seed spread): steps help, rows do not
    inconclusive          anything else; the lever with the largest gain is named ("leaning ...") when
                          it gains >= CLIMB beyond the seed spread
A gap, rise or gain smaller than the largest seed spread seen is flagged as within seed noise.
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
CLIMB = 10.0  # points: a lever's gain over its base that counts as "helps" (e.g. twice the steps)
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


# Swept keys that make an arm a variant of its recipe, and how its name shows them.
VARIANT_KEYS = {
    "model.conditioning": str,  # +gated, +prefix_film (the decoder's conditioning type)
    "train.epochs": lambda v: f"{v}ep",  # +24ep (the training budget)
    "model.fusion_depth": lambda v: f"fusion{v}",  # +fusion3 (plan-former depth)
    "model.semantic_predictor_depth": lambda v: f"pred{v}",
}


def variant_of(row: dict[str, Any]) -> str:
    """`+gated`, `+24ep`, `+fusion3+pred3`, or "" for the study's standard recipe."""
    parts = [show(row[k]) for k, show in VARIANT_KEYS.items() if row.get(k) is not None]
    if row.get("conditioning") not in (None, "cross_attn") and "model.conditioning" not in row:
        parts.insert(0, str(row["conditioning"]))
    return "".join(f"+{p}" for p in parts)


def arm_of(row: dict[str, Any]) -> str:
    """`K16/scratch`, `none/frozen`, `K16/scratch+gated`, ..."""
    bottleneck = row.get("bottleneck") or row.get("model.bottleneck", "plan")
    where = "none" if bottleneck == "none" else f"K{row.get('K') or row.get('model.num_latent_vectors')}"
    return f"{where}/{features_of(row)}{variant_of(row)}"


@dataclass
class Arm:
    name: str
    bottleneck: str
    K: int | None
    features: str
    plan_bits: int  # on the wire: plan_len x D fp16 values x 16 bits
    rows: list[dict[str, Any]] = field(default_factory=list)
    variant: str = ""  # "+gated", "+24ep", ... ("" = the study's standard recipe)

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
                variant=variant_of(row),
            )
        arms[name].rows.append(row)
    order = {"scratch": 0, "category": 1, "infonce": 2, "frozen": 3}
    return sorted(arms.values(), key=lambda a: (a.bottleneck == "plan", a.K or 0, order.get(a.features, 9), a.variant))


def lever_kinds(arm: Arm) -> list[str]:
    """What an arm at the log's K changes against the standard scratch plan there."""
    kinds = {"category": ["objective"], "infonce": ["objective"], "frozen": ["features"]}.get(arm.features, [])
    for part in filter(None, arm.variant.split("+")):
        if part.endswith("ep") and part[:-2].isdigit():
            kinds.append("budget")
        elif part.startswith(("fusion", "pred")):
            kinds.append("plan former")
        else:
            kinds.append("conditioning")
    return list(dict.fromkeys(kinds))


TRAINING_LEVERS = ("objective", "features", "conditioning", "budget")


@dataclass
class Lever:
    arm: str
    kinds: list[str]
    score: float
    control: str  # the matched control
    gap: float  # matched control - score
    base: str  # what its gain is measured against
    gain: float
    closes: bool


@dataclass
class Verdict:
    label: str
    reasons: list[str]
    evidence: list[str]  # arm names the verdict rests on
    noise: float  # the largest seed spread of the score


def best_control(controls: dict[str, float]) -> str:
    """The best no-bottleneck arm at the standard recipe (no variant), else the best of all."""
    standard = {name: v for name, v in controls.items() if "+" not in name}
    return max(standard or controls, key=(standard or controls).get)


def levers(arms: Sequence[Arm], metric: str, k: int) -> list[Lever]:
    """Every arm at K other than the standard scratch plan, against its matched control and its base."""
    scored = {a.name: a.mean(metric) for a in arms if a.mean(metric) is not None}
    controls = {a.name: scored[a.name] for a in arms if a.bottleneck == "none" and a.name in scored}
    plan = f"K{k}/scratch"
    out = []
    for a in arms:
        if a.bottleneck != "plan" or k != a.K or a.name == plan or a.name not in scored:
            continue
        budget = [p for p in a.variant.split("+") if p.endswith("ep") and p[:-2].isdigit()]
        # The control with the same features at the same budget, else at the standard one, else the best.
        same = [f"none/{a.features}+{budget[0]}"] if budget else []
        matched = next((c for c in [*same, f"none/{a.features}"] if c in controls), best_control(controls))
        base = plan
        if budget:
            base = a.name.replace(f"+{budget[0]}", "")
        if base not in scored:
            base = plan
        s = scored[a.name]
        gap = controls[matched] - s
        out.append(Lever(a.name, lever_kinds(a), s, matched, gap, base, s - scored[base], gap <= CLOSED_GAP))
    return out


def verdict(arms: Sequence[Arm], metric: str, log_k: int = LOG_K) -> Verdict:
    """Apply the module docstring's rules to the arms' mean `metric`."""
    spreads = [s for a in arms if (s := a.spread(metric)) is not None]
    noise = max(spreads) if spreads else 0.0
    scored = {a.name: a.mean(metric) for a in arms if a.mean(metric) is not None}
    controls = [a for a in arms if a.bottleneck == "none" and a.name in scored]
    if not controls:
        return Verdict("inconclusive", ["no no-bottleneck control finished"], [], noise)
    name = best_control({a.name: scored[a.name] for a in controls})
    control = next(a for a in controls if a.name == name)
    c = scored[control.name]
    standard = [a for a in arms if a.bottleneck == "plan" and a.features == "scratch" and not a.variant]
    ks = sorted({a.K for a in standard if a.name in scored})
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
    plan_arm = next(a for a in arms if a.name == plan)
    if plan_arm.plan_bits >= control.plan_bits > 0:
        reasons.append(
            f"{plan} ships {plan_arm.plan_bits:,} bits on the wire, no fewer than the {control.plan_bits:,} "
            "the control's decoder reads: the wire's size is not what it lacks"
        )
    if gap <= NOT_LIMITED_GAP:
        reasons.append(f"gap <= NOT_LIMITED_GAP {NOT_LIMITED_GAP:g}")
        return Verdict("not limited", reasons, [control.name, plan], noise)
    lo, hi = f"K{ks[0]}/scratch", f"K{ks[-1]}/scratch"
    rise = scored[hi] - scored[lo]
    rises = len(ks) > 1 and rise >= RISE
    reasons.append(f"scratch plan {lo} -> {hi}: {scored[lo]:.1f} -> {scored[hi]:.1f} ({rise:+.1f}; RISE {RISE:g})")
    found = levers(arms, metric, k)
    for lv in found:
        reasons.append(
            f"lever {lv.arm} ({', '.join(lv.kinds)}) = {lv.score:.1f}: {lv.gap:.1f} below {lv.control} "
            f"({'closes' if lv.closes else 'does not close'} the gap: CLOSED_GAP {CLOSED_GAP:g}); "
            f"{lv.gain:+.1f} over {lv.base}"
            + ("; no control ran at this budget" if "budget" in lv.kinds and "ep" not in lv.control else "")
        )
    near = [lv for lv in found if not lv.closes and noise and lv.gap - CLOSED_GAP <= noise]
    if near:
        reasons.append(
            "warning: within the seed spread of closing the gap: "
            + ", ".join(f"{lv.arm} (misses CLOSED_GAP by {lv.gap - CLOSED_GAP:.1f})" for lv in near)
        )
    closing = [lv for lv in found if lv.closes]
    training = [lv for lv in closing if set(lv.kinds) <= set(TRAINING_LEVERS)]
    former = [lv for lv in closing if "plan former" in lv.kinds]
    best = max(found, key=lambda lv: lv.gain) if found else None
    evidence = [control.name, plan, lo, hi] + [lv.arm for lv in closing] + ([best.arm] if best else [])
    evidence += [lv.control for lv in closing] + ([best.control, best.base] if best else [])
    evidence = list(dict.fromkeys(evidence))
    if noise and (gap <= noise or (rises and rise <= noise)):
        reasons.append(f"warning: a deciding difference is within the seed spread ({noise:.1f} points)")
    if closing and rises:
        reasons.append("a lever closes the gap at the same K, and K also matters: mostly trainability")
        return Verdict("mixed (trainability first)", reasons, evidence, noise)
    if training:
        reasons.append(f"closed at the same K x D by training alone: {', '.join(lv.arm for lv in training)}")
        return Verdict("trainability-limited", reasons, evidence, noise)
    if former:
        reasons.append("closed at the same K x D only by a deeper plan former: the pooling, not the wire")
        return Verdict("plan-former-limited", reasons, evidence, noise)
    if rises:
        return Verdict("capacity-limited", reasons, evidence, noise)
    helps = best is not None and best.gain >= CLIMB and best.gain > noise
    budget = [lv for lv in found if "budget" in lv.kinds]
    if budget and all(lv.gain >= CLIMB and lv.gain > noise for lv in budget):
        gains = ", ".join(f"{lv.arm} {lv.gain:+.1f} over {lv.base}" for lv in budget)
        reasons.append(
            f"nothing closes the gap; more steps lift every recipe tried ({gains}: >= CLIMB {CLIMB:g}, beyond the "
            f"seed spread {noise:.1f}) where {ks[-1] // max(ks[0], 1)}x the plan rows gains {rise:+.1f}"
        )
        evidence = list(dict.fromkeys([*evidence, *(x for lv in budget for x in (lv.arm, lv.base))]))
        return Verdict("trainability-limited (climbing, not closed)", reasons, evidence, noise)
    reasons.append("the plan is low and flat across K, and no lever closes the gap at this budget")
    if helps:
        return Verdict(
            f"inconclusive (leaning {best.kinds[-1]}: {best.arm} {best.gain:+.1f})", reasons, evidence, noise
        )
    if best is not None:
        reasons.append(
            f"largest lever gain {best.arm} {best.gain:+.1f}: below CLIMB {CLIMB:g} or within the seed spread "
            f"{noise:.1f}"
        )
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
    lines = ["# Bottleneck study", "", f"**Verdict: {v.label}**", ""]
    lines += [f"- {r}" for r in v.reasons]
    lines += [f"- evidence rows: {', '.join(f'`{e}`' for e in v.evidence) or '-'}"]
    lines += [f"- largest seed spread of `{metric}`: {v.noise:.1f} points (± is half the spread over seeds)", ""]
    lines += ["## How it was run", "", *header, ""]
    lines += ["## Arms", "", *arm_table(arms, metric, compo), ""]
    runs = sorted({str(r["study_run"]) for a in arms for r in a.rows if r.get("study_run")})
    if runs:
        lines += ["## Where each row came from", "", "| run | arms (seeds) |", "|---|---|"]
        for run in runs:
            mine = [(a.name, sum(r.get("study_run") == run for r in a.rows)) for a in arms]
            lines.append(f"| {run} | " + ", ".join(f"`{n}` ({c})" for n, c in mine if c) + " |")
        lines.append("")
    lines += [
        "## Rules",
        "",
        f"Thresholds: CONTROL_FLOOR = {CONTROL_FLOOR:g}, NOT_LIMITED_GAP = {NOT_LIMITED_GAP:g}, "
        f"CLOSED_GAP = {CLOSED_GAP:g}, RISE = {RISE:g}, CLIMB = {CLIMB:g} (points of `{metric}`); "
        f"the log's K = {LOG_K}.",
        "",
        "A lever is an arm at the log's K that changes one thing against the standard scratch plan there "
        "(objective, frozen features, decoder conditioning, +Nep training budget, plan-former depth): the same "
        "K x D on the wire. It closes the gap when it is within CLOSED_GAP of its matched control (the "
        "no-bottleneck arm with the same features at the same budget, else at the standard budget, else the best "
        "control); its gain is measured against its "
        "base (the same arm at the standard budget for a +Nep arm, else the standard scratch plan).",
        "",
        "- feature-limited: the best no-bottleneck control < CONTROL_FLOOR.",
        "- not limited: control - scratch plan at K <= NOT_LIMITED_GAP.",
        "- mixed: a lever closes the gap and the scratch plan rises by >= RISE from the smallest to the largest K.",
        "- trainability-limited: a training lever (objective, features, conditioning, budget) closes the gap and "
        "the plan is flat across K.",
        "- plan-former-limited: only a deeper plan former closes the gap (flat across K).",
        "- capacity-limited: the scratch plan rises by >= RISE with K and no lever closes the gap.",
        "- trainability-limited (climbing, not closed): nothing closes, flat across K, and every +Nep arm gains "
        ">= CLIMB (beyond the seed spread) over the same recipe at the standard budget.",
        "- otherwise inconclusive; `leaning X` names the lever kind with the largest gain when it gains >= CLIMB "
        "beyond the seed spread.",
        "",
        "Plan bits on the wire: plan rows x D x 16 (fp16). Bits recovered: the information of the attributes the "
        "greedy caption names right (jobs/scene_metrics.py). Collapse columns as in the research log.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild a report from rows.json (e.g. rows merged from several study runs): report, verdict, plots."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m jobs.study_report", description=main.__doc__)
    p.add_argument("--rows", required=True, help="rows.json written by python -m jobs.study")
    p.add_argument("--out", required=True, help="folder for report.md, verdict.txt, rows.json and the plots")
    p.add_argument("--header", default="", help="a Markdown file of header lines (commands, runtimes, machine)")
    p.add_argument("--metric", default="scene_bits_recovered_pct")
    p.add_argument("--bits-per-image", type=float, default=None, help="the data's bits per image, for the plot")
    args = p.parse_args(argv)
    try:
        rows = json.loads(Path(args.rows).read_text())
        header = Path(args.header).read_text().splitlines() if args.header else []
    except (OSError, ValueError) as exc:
        print(f"study_report: {exc}")
        return 2
    if not isinstance(rows, list) or not rows:
        print(f"study_report: {args.rows}: expected a non-empty list of rows")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = summarise(rows)
    v = verdict(arms, args.metric)
    compo = any("compo_scene_bits_recovered_pct" in r for r in rows)
    (out / "report.md").write_text(markdown(arms, v, metric=args.metric, header=header, compo=compo))
    (out / "verdict.txt").write_text(f"{v.label}\n" + "\n".join(v.reasons) + "\n")
    if Path(args.rows).resolve() != (out / "rows.json").resolve():
        (out / "rows.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    plots(out, arms, args.metric, args.bits_per_image)
    print(f"study_report: {out / 'report.md'}; verdict: {v.label}")
    return 0


def plots(folder: Path, arms: Sequence[Arm], metric: str, bits_per_image: float | None) -> list[Path]:
    """bits recovered vs plan bits on the wire, and per-attribute accuracy per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=100)
    key = "scene_bits_recovered" if any(a.mean("scene_bits_recovered") is not None for a in arms) else metric
    for recipe in dict.fromkeys(a.features + a.variant for a in arms):  # one line per recipe across K
        mine = [a for a in arms if a.features + a.variant == recipe and a.mean(key) is not None]
        plan = sorted((a for a in mine if a.bottleneck == "plan"), key=lambda a: a.plan_bits)
        if plan:
            ax.errorbar(
                [a.plan_bits for a in plan],
                [a.mean(key) for a in plan],
                yerr=[(a.spread(key) or 0) / 2 for a in plan],
                marker="o",
                capsize=3,
                label=f"plan, {recipe}",
            )
        for a in mine:
            if a.bottleneck == "none":
                ax.scatter([a.plan_bits], [a.mean(key)], marker="*", s=120, label=f"no bottleneck, {recipe}")
    if bits_per_image:
        ax.axhline(bits_per_image, linestyle="--", color="grey", label="bits per image")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("plan bits on the wire (rows x D x 16)")
    ax.set_ylabel("bits recovered per image" if key == "scene_bits_recovered" else metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: many recipes
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


if __name__ == "__main__":
    raise SystemExit(main())
