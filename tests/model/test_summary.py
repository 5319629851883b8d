"""`python -m model.summary`: the config, the table, and `trainable_params=N` as the last line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.summary import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("preset", "expected"), [("seed_run2", 16_930_048), ("seed_run3", 16_995_844), ("seed_run4", 18_052_608)]
)
def test_last_line_is_the_trainable_count(preset: str, expected: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([preset]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"trainable_params={expected}"
    assert f"preset = {preset}" in lines
    assert any(line.lstrip().startswith("predictor") for line in lines)


def test_overrides_change_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["debug", "--model.bottleneck=none"]) == 0
    out = capsys.readouterr().out
    assert "model.bottleneck = 'none'" in out
    assert not any(line.strip().startswith("predictor") for line in out.splitlines())
    assert main(["debug"]) == 0
    plan_count = int(capsys.readouterr().out.strip().splitlines()[-1].split("=")[1])
    none_count = int(out.strip().splitlines()[-1].split("=")[1])
    assert none_count < plan_count


def test_cli_prints_count_last_and_rejects_unknown_presets() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "model.summary", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)

    ok = run("seed_run2")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == "trainable_params=16930048"
    bad_preset = run("seed_run9")
    assert bad_preset.returncode != 0 and bad_preset.stdout == ""
    assert "seed_run9" in bad_preset.stderr and "seed_run2" in bad_preset.stderr and "debug" in bad_preset.stderr


def test_unknown_key_or_bad_value_exits_nonzero_with_valid_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["debug", "--model.embed_dims=64"]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "model.embed_dims" in captured.err and "model.embed_dim," in captured.err
    assert main(["debug", "--model.conditioning=film"]) != 0
    assert "cross_attn" in capsys.readouterr().err
