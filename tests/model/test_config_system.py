"""The config system: presets, checked overrides, validation, exact round trips."""

from __future__ import annotations

import pytest

from model.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    get_preset,
    load_config,
    parse_overrides,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips(name: str) -> None:
    cfg = get_preset(name).validate()
    assert cfg.preset == name
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_presets_carry_the_logs_settings() -> None:
    run2, run3, run4 = (get_preset(f"seed_run{i}") for i in (2, 3, 4))
    assert (run2.model.conditioning, run3.model.conditioning, run4.model.conditioning) == (
        "cross_attn",
        "gated",
        "prefix_film",
    )
    assert run3.model.plan_dropout == 0.2 and run4.model.word_dropout == 0.3
    assert run2.train.epochs == 100 and run2.data.num_samples == 20_000 and run2.train.lr == 3e-4
    assert run2.train.resolved_warmup_epochs() == 10
    assert get_preset("seed_run1").train.epochs == 30 and get_preset("seed_run1").data.num_samples == 4_000
    shapes = get_preset("shapes").model
    assert (shapes.embed_dim, shapes.num_heads, shapes.num_latent_vectors, shapes.image_size) == (128, 4, 8, 32)


def test_presets_are_fresh_copies() -> None:
    a = get_preset("debug")
    a.model.embed_dim = 999
    assert get_preset("debug").model.embed_dim != 999


def test_overrides_are_parsed_and_typed() -> None:
    cfg = load_config(
        "seed_run2",
        ["--model.num_latent_vectors=32", "--train.lr", "1e-3", "--train.compile=true", "--model.conditioning=gated"],
    )
    assert cfg.model.num_latent_vectors == 32
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.compile is True
    assert cfg.model.conditioning == "gated"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.nope=1", "unknown config key 'model.nope'"),
        ("--nosection.x=1", "unknown config key"),
        ("--model.embed_dim=abc", "model.embed_dim='abc' is not an integer"),
        ("--model.embed_dim=2.5", "is not an integer"),
        ("--train.lr=fast", "train.lr='fast' is not a number"),
        ("--train.compile=maybe", "is not a boolean"),
        ("--model.conditioning=film", "is not one of cross_attn, gated, prefix_film"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("debug", [override])


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_preset("debug"), {"model.k": 3})
    assert "model.num_latent_vectors" in str(err.value)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match="valid presets: debug, shapes"):
        get_preset("run5")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"model.embed_dim": 33}, "model.embed_dim=33 is not divisible by model.num_heads=2"),
        ({"model.image_size": 20}, "model.image_size=20 is not divisible by model.patch_size=8"),
        ({"model.plan_dropout": 1.0}, "model.plan_dropout=1.0 must be in [0, 1)"),
        ({"train.num_workers": 4, "train.batch_size": 2}, "train.batch_size=2 is smaller than train.num_workers=4"),
        ({"model.max_seq_length": 5}, "shorter than the query"),
        ({"model.bottleneck": "none", "objective.infonce_weight": 0.5}, "which model.bottleneck=none does not build"),
    ],
)
def test_validation_names_the_offending_values(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("debug", overrides)
    assert fragment in str(err.value)


def test_from_dict_rejects_unknown_nested_keys() -> None:
    data = get_preset("debug").to_dict()
    data["model"]["secret"] = 1
    with pytest.raises(ConfigError, match="model.secret"):
        Config.from_dict(data)


def test_flat_keys_match_override_keys() -> None:
    cfg = get_preset("debug")
    flat = cfg.flat()
    assert flat["model.embed_dim"] == 32
    # every flat key (but the preset name) is a valid override target
    apply_overrides(cfg, {k: v for k, v in flat.items() if k != "preset"})


def test_parse_overrides_rejects_malformed() -> None:
    with pytest.raises(ConfigError, match="must look like"):
        parse_overrides(["model.embed_dim=3"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--model.embed_dim"])
