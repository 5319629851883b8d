"""Search spaces: parsing, expansion and validation before launch (no Ray)."""

from __future__ import annotations

import json

import pytest

from jobs.sweep_spaces import NAMED_SPACES, Space, expand, load_space, resolve, space_from_dict
from model.config import ConfigError


def test_named_spaces_expand_and_validate_at_full_and_quick_size():
    for name in NAMED_SPACES:
        for space in (load_space(name), load_space(name).quick()):
            trials, errors, _ = resolve(space, expand(space))
            assert errors == [], (name, errors)
            assert trials, name


def test_bottleneck_space_has_the_controls_and_drops_inert_k():
    space = load_space("bottleneck")
    points = expand(space)
    assert len(points) == 3 * 3 * 2 * 2 - 9  # InfoNCE needs the plan path: no (none, 0.5) corner
    trials, errors, notes = resolve(space, points)
    assert errors == []
    # K is inert without a bottleneck: one trial per conditioning remains, not x3 K.
    plan = [t for t in trials if t.config.model.bottleneck == "plan"]
    none = [t for t in trials if t.config.model.bottleneck == "none"]
    assert len(plan) == 18 and len(none) == 3
    assert len(notes) == 6 and all("skipped" in n for n in notes)
    assert {t.config.objective.infonce_weight for t in plan} == {0.0, 0.5}


def test_log_runs_swaps_presets_per_point():
    trials, errors, _ = resolve(load_space("log_runs"), expand(load_space("log_runs")))
    assert errors == []
    got = {t.config.model.conditioning: t.config for t in trials}
    assert set(got) == {"cross_attn", "gated", "prefix_film"}
    assert got["gated"].model.plan_dropout == 0.2
    assert got["prefix_film"].model.word_dropout == 0.3


def test_scale_space_covers_the_logs_next_steps():
    trials, _, _ = resolve(load_space("scale"), expand(load_space("scale")))
    assert len(trials) == 27
    assert {t.config.model.image_size for t in trials} == {64, 128, 224}
    assert {t.config.model.embed_dim for t in trials} == {256, 512, 768}


def test_space_file_json_with_grid_and_random_axes(tmp_path):
    path = tmp_path / "mine.json"
    spec = {
        "base_preset": "debug",
        "overrides": {"train.epochs": 1},
        "grid": {"model.num_latent_vectors": [2, 4]},
        "random": {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "objective.diversity_weight": {"uniform": [0.0, 1.0]},
            "model.conditioning": {"choice": ["cross_attn", "gated"]},
        },
    }
    path.write_text(json.dumps(spec))
    space = load_space(str(path))
    points = expand(space, num_samples=3, seed=7)
    assert len(points) == 6
    assert expand(space, num_samples=3, seed=7) == points  # pre-sampled deterministically
    assert expand(space, num_samples=3, seed=8) != points
    for p in points:
        assert 1e-4 <= p["train.lr"] <= 1e-2
        assert 0.0 <= p["objective.diversity_weight"] <= 1.0
    trials, errors, _ = resolve(space, points)
    assert errors == [] and len(trials) == 6
    assert all(t.config.train.epochs == 1 and t.config.preset == "debug" for t in trials)


def test_space_file_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base_preset: debug\ngrid:\n  model.embed_dim: [32, 64]\n")
    space = load_space(str(path))
    assert space.grid == {"model.embed_dim": [32, 64]} and space.name == "s"


def test_invalid_grid_points_are_named_with_their_values():
    space = Space(
        name="bad",
        base_preset="debug",
        grid={"model.embed_dim": [32, 33], "model.image_size": [16, 20]},
    )
    trials, errors, _ = resolve(space, expand(space))
    assert len(trials) == 1  # only 32 x 16 is valid
    assert len(errors) == 3
    joined = "\n".join(errors)
    assert "model.embed_dim=33 is not divisible by model.num_heads=2" in joined
    assert "model.image_size=20 is not divisible by model.patch_size=8" in joined
    assert any(e.startswith("model.embed_dim=33 model.image_size=16:") for e in errors)


def test_sampled_random_points_are_validated_too():
    space = Space(name="r", base_preset="debug", random={"model.embed_dim": {"choice": [31]}})
    trials, errors, _ = resolve(space, expand(space, num_samples=2))
    assert trials == [] and len(errors) == 2 and "model.embed_dim=31" in errors[0]


def test_unknown_key_and_bad_type_and_overlap_are_errors():
    space = Space(name="u", base_preset="debug", grid={"model.nope": [1]})
    _, errors, _ = resolve(space, expand(space))
    assert "unknown config key 'model.nope'" in errors[0]
    space = Space(name="t", base_preset="debug", grid={"model.embed_dim": ["wide"]})
    _, errors, _ = resolve(space, expand(space))
    assert "model.embed_dim='wide' is not an integer" in errors[0]
    space = Space(name="o", base_preset="debug", grid={"model.embed_dim": [32]})
    _, errors, _ = resolve(space, expand(space), {"model.embed_dim": 64})
    assert "also swept" in errors[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "must be a mapping"),
        ({"grid": {}}, "at least one grid or random axis"),
        ({"grid": {"model.embed_dim": 32}}, "must be a non-empty list"),
        ({"random": {"train.lr": {"normal": [0, 1]}}}, "must be one of"),
        ({"random": {"train.lr": {"uniform": [1, 0]}}}, "lo=1 > hi=0"),
        ({"random": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform needs lo > 0"),
        ({"grid": {"a.b": [1]}, "random": {"a.b": {"choice": [1]}}}, "both a grid and a random axis"),
        ({"grid": {"a.b": [1]}, "extra": 1}, "unknown key(s) extra"),
        ({"grid": {"a.b": [1]}, "exclude": [{}]}, "exclude must be a list"),
    ],
)
def test_malformed_space_files_are_rejected(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        space_from_dict(spec, name="f")


def test_unknown_space_name_lists_the_named_ones(tmp_path):
    with pytest.raises(ConfigError, match="log_runs, bottleneck, scale"):
        load_space("nonesuch")
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_space(str(bad))
