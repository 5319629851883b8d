"""Search spaces for `jobs.sweep`: the named spaces, space files, and trial expansion.

A space is a base preset, fixed overrides, grid axes and random axes over dotted config keys:

    {"base_preset": "seed_run2",
     "overrides": {"train.epochs": 20},
     "grid":   {"model.num_latent_vectors": [4, 16, 64], "model.conditioning": ["cross_attn", "gated"]},
     "random": {"objective.diversity_weight": {"uniform": [0.0, 1.0]},
                "train.lr": {"loguniform": [1e-4, 1e-3]},
                "model.embed_dim": {"choice": [256, 512]}}}

The sweep expands a space into an explicit list of trial points *before* anything launches: the
grid's cartesian product, repeated `num_samples` times, each repeat drawing the random axes from a
seeded generator. Every point is turned into a full `Config` and validated, so a bad combination is
reported with its values instead of failing a trial an hour in. The special grid key `preset`
swaps the base preset per point (the log's Runs 2-4 differ in more than one field).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import Config, ConfigError, apply_overrides, get_preset

DISTRIBUTIONS = ("choice", "uniform", "loguniform")
SPACE_FILE_KEYS = ("base_preset", "overrides", "grid", "random", "exclude", "description")


@dataclass
class Space:
    """A search space: base preset + fixed overrides + grid axes + random axes."""

    name: str
    base_preset: str = "seed_run2"
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    # Grid corners that are not experiments, e.g. {"model.bottleneck": "none", "objective.infonce_weight": 0.5}.
    exclude: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    # --quick: laptop-sized overrides (and optionally smaller grid axes) for the synthetic set.
    quick_overrides: dict[str, Any] = field(default_factory=dict)
    quick_grid: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        """Every swept key, grid first, in declaration order."""
        return list(self.grid) + [k for k in self.random if k not in self.grid]

    def quick(self) -> Space:
        """The laptop flavour: quick overrides on top, quick grid axes replacing the full ones."""
        out = copy.deepcopy(self)
        out.overrides = {**self.overrides, **self.quick_overrides}
        out.grid = {k: self.quick_grid.get(k, v) for k, v in self.grid.items()}
        out.name = f"{self.name} (quick)"
        return out


@dataclass
class TrialPoint:
    """One validated trial: the swept values and the full config they produce."""

    values: dict[str, Any]  # swept key -> value, e.g. {"model.num_latent_vectors": 16}
    config: Config


# ---------------------------------------------------------------------------
# Named spaces


# A laptop-sized model: the debug preset's depth-1 blocks, 32x32 images (16 patches), a few epochs.
_QUICK_MODEL = {
    "model.embed_dim": 32,
    "model.num_heads": 2,
    "model.encoder_depth": 1,
    "model.text_encoder_depth": 1,
    "model.fusion_depth": 1,
    "model.semantic_predictor_depth": 1,
    "model.decoder_depth": 1,
    "model.image_size": 32,
    "model.patch_size": 8,
    "model.max_seq_length": 48,
    "data.num_samples": 0,
    "train.epochs": 3,
    "train.batch_size": 16,
    "train.lr": 1e-3,
    "train.eval_samples": 2,
}


def _log_runs() -> Space:
    return Space(
        name="log_runs",
        base_preset="seed_run2",
        description="The log's Runs 2-4 side by side: cross_attn, gated (+plan dropout), prefix_film (+word dropout).",
        grid={"preset": ["seed_run2", "seed_run3", "seed_run4"]},
        quick_overrides=dict(_QUICK_MODEL),
    )


def _bottleneck() -> Space:
    return Space(
        name="bottleneck",
        base_preset="seed_run2",
        description=(
            "K x conditioning x (plan | no bottleneck) x InfoNCE on/off: separates 'the plan is too small' "
            "(no-bottleneck trials caption well, small-K trials do not) from 'the features are too weak' "
            "(nothing captions well, and InfoNCE moves the needle)."
        ),
        grid={
            "model.num_latent_vectors": [4, 16, 64],
            "model.conditioning": ["cross_attn", "gated", "prefix_film"],
            "model.bottleneck": ["plan", "none"],
            "objective.infonce_weight": [0.0, 0.5],
        },
        # InfoNCE contrasts plans with caption embeddings from the text encoder, which only the plan path builds.
        exclude=[{"model.bottleneck": "none", "objective.infonce_weight": 0.5}],
        quick_overrides=dict(_QUICK_MODEL),
    )


def _scale() -> Space:
    return Space(
        name="scale",
        base_preset="seed_run2",
        description=(
            "The log's next step: trade bandwidth for information with K x embed_dim x image size. "
            "Image 224 works with patch_size 8 (784 patches) or 16 (196); 64 and 128 with 8 or 16 too."
        ),
        grid={
            "model.num_latent_vectors": [16, 32, 64],
            "model.embed_dim": [256, 512, 768],
            "model.image_size": [64, 128, 224],
        },
        quick_overrides=dict(_QUICK_MODEL),
        quick_grid={
            "model.num_latent_vectors": [4, 16, 64],
            "model.embed_dim": [32, 64],
            "model.image_size": [32, 64],
        },
    )


NAMED_SPACES = {"log_runs": _log_runs, "bottleneck": _bottleneck, "scale": _scale}


# ---------------------------------------------------------------------------
# Loading


def load_space(name_or_file: str) -> Space:
    """A named space, or a JSON/YAML space file; errors name the bad part."""
    if name_or_file in NAMED_SPACES:
        return NAMED_SPACES[name_or_file]()
    path = Path(name_or_file)
    if not path.is_file():
        raise ConfigError(f"unknown space {name_or_file!r}: not one of {', '.join(NAMED_SPACES)} and not a file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError / yaml.YAMLError: both carry a position
        raise ConfigError(f"space file {path}: cannot parse: {exc}") from None
    return space_from_dict(data, name=path.stem)


def space_from_dict(data: Any, *, name: str = "custom") -> Space:
    """Check a parsed space file's shape (not yet its values: that needs the whole config)."""
    if not isinstance(data, dict):
        raise ConfigError(f"space {name}: must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPACE_FILE_KEYS))
    if unknown:
        raise ConfigError(f"space {name}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SPACE_FILE_KEYS)}")
    overrides = data.get("overrides") or {}
    grid = data.get("grid") or {}
    rand = data.get("random") or {}
    for section, value in (("overrides", overrides), ("grid", grid), ("random", rand)):
        if not isinstance(value, dict):
            raise ConfigError(f"space {name}: {section} must be a mapping of dotted keys")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"space {name}: grid axis {key} must be a non-empty list, got {values!r}")
    for key, dist in rand.items():
        _check_distribution(name, key, dist)
        if key in grid:
            raise ConfigError(f"space {name}: {key} is both a grid and a random axis")
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise ConfigError(f"space {name}: exclude must be a list of non-empty {{key: value}} mappings")
    if not grid and not rand:
        raise ConfigError(f"space {name}: needs at least one grid or random axis")
    return Space(
        name=name,
        base_preset=str(data.get("base_preset", "seed_run2")),
        overrides=dict(overrides),
        grid={k: list(v) for k, v in grid.items()},
        random=dict(rand),
        exclude=[dict(e) for e in exclude],
        description=str(data.get("description", "")),
    )


def _check_distribution(space: str, key: str, dist: Any) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"space {space}: random axis {key} must be one of "
            f'{{"choice": [...]}}, {{"uniform": [lo, hi]}}, {{"loguniform": [lo, hi]}}; got {dist!r}'
        )
    kind, args = next(iter(dist.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"space {space}: random axis {key}: {kind} needs a non-empty list, got {args!r}")
    if kind == "choice":
        return
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"space {space}: random axis {key}: {kind} needs [lo, hi] numbers, got {args!r}")
    lo, hi = args
    if lo > hi:
        raise ConfigError(f"space {space}: random axis {key}: {kind} lo={lo} > hi={hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"space {space}: random axis {key}: loguniform needs lo > 0, got {lo}")


# ---------------------------------------------------------------------------
# Expansion and validation


def sample(dist: dict[str, list[Any]], rng: random.Random) -> Any:
    """One draw from a checked distribution."""
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        return rng.choice(args)
    lo, hi = args
    if kind == "uniform":
        return rng.uniform(lo, hi)
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def expand(space: Space, *, num_samples: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Grid cartesian product x num_samples, random axes pre-drawn with `seed` (deterministic)."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples={num_samples} must be >= 1")
    rng = random.Random(seed)
    keys = list(space.grid)
    combos = list(itertools.product(*(space.grid[k] for k in keys))) if keys else [()]
    points = []
    for _ in range(num_samples):
        for combo in combos:
            point = dict(zip(keys, combo, strict=True))
            if any(all(point.get(k) == v for k, v in rule.items()) for rule in space.exclude):
                continue
            for key, dist in space.random.items():
                point[key] = sample(dist, rng)
            points.append(point)
    return points


def build_config(space: Space, point: dict[str, Any], base_overrides: dict[str, Any] | None = None) -> Config:
    """Preset (the point's, else the space's) + space overrides + CLI base overrides + swept values."""
    preset = point.get("preset", space.base_preset)
    cfg = get_preset(str(preset))
    swept = {k: v for k, v in point.items() if k != "preset"}
    cfg = apply_overrides(cfg, {**space.overrides, **(base_overrides or {})})
    return apply_overrides(cfg, swept).validate()


def resolve(
    space: Space, points: list[dict[str, Any]], base_overrides: dict[str, Any] | None = None
) -> tuple[list[TrialPoint], list[str], list[str]]:
    """Validate every point. Returns (trials, errors, notes); errors name each bad point's values.

    Points that produce the same training run are kept once: with `model.bottleneck=none` the
    decoder reads every patch, so `model.num_latent_vectors` has no effect.
    """
    overlap = sorted(set(base_overrides or {}) & set(space.axes))
    if overlap:
        return [], [f"override(s) {', '.join(overlap)} also swept by space {space.name}: drop one of them"], []
    trials: list[TrialPoint] = []
    errors: list[str] = []
    notes: list[str] = []
    seen: dict[str, dict[str, Any]] = {}
    for point in points:
        try:
            cfg = build_config(space, point, base_overrides)
        except ConfigError as exc:
            errors.append(f"{describe(point)}: {exc}")
            continue
        key = _identity(cfg)
        if key in seen:
            notes.append(f"{describe(point)} trains the same model as {describe(seen[key])}: skipped")
            continue
        seen[key] = point
        trials.append(TrialPoint(values=dict(point), config=cfg))
    return trials, errors, notes


def _identity(cfg: Config) -> str:
    """What makes two trials the same run (K is inert without a bottleneck)."""
    data = cfg.to_dict()
    data.pop("preset")
    if cfg.model.bottleneck == "none":
        data["model"].pop("num_latent_vectors")
    return json.dumps(data, sort_keys=True)


def describe(point: dict[str, Any]) -> str:
    """`model.num_latent_vectors=16 model.conditioning=gated` (floats shortened)."""
    return " ".join(f"{k}={_short(v)}" for k, v in point.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
