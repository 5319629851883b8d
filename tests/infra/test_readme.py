"""The README stays true to the code: both commands, CI's entry point, every config field and preset."""

from __future__ import annotations

from pathlib import Path

from model.config import PRESETS, Config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_two_commands_and_ci_entry() -> None:
    assert "make demo" in README and "make test" in README
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1].strip() == "make test"
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_every_config_field_is_documented() -> None:
    missing = [key for key in Config().flat() if key != "preset" and f"`{key}`" not in README]
    assert not missing, f"README's configuration table lacks: {missing}"


def test_every_preset_is_documented() -> None:
    missing = [name for name in PRESETS if f"`{name}`" not in README]
    assert not missing, f"README's preset table lacks: {missing}"
