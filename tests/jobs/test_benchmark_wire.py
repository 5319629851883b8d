"""benchmarks.wire end to end on a tiny model: every format row, the baselines, sizes that follow the codec."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import wire
from model.checkpoint import save_model
from model.codec import COMPRESSION_CODES, DTYPE_CODES, HEADER_SIZE, plan_nbytes
from model.config import load_config
from model.model import build_model

TINY = ["--preset", "debug", "--steps", "5", "--per-class", "1", "--val-per-class", "1", "--threads", "1"]


def table(out: str) -> dict[str, list[str]]:
    """The printed markdown table: format name -> the other cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] != "format":
            rows[cells[0]] = cells[1:]
    return rows


def test_trains_and_reports_every_format_and_baseline(capsys):
    assert wire.main([*TINY, "--model.wire_dim=8"]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    formats = [d if c == "none" else f"{d}+{c}" for d in DTYPE_CODES for c in COMPRESSION_CODES]
    assert [name for name in rows if name in formats] == formats
    k, d = 4, 8  # debug preset: K=4; the plan is wire_dim wide
    assert "plan K=4 x 8 (embed_dim 32, wire_dim 8)" in out
    for dtype in DTYPE_CODES:  # uncompressed sizes are exactly the codec's
        assert int(rows[dtype][0].replace(",", "")) == HEADER_SIZE + plan_nbytes(k, d, dtype)
    assert rows["fp16"][1] == "100.0%"  # the reference agrees with itself
    for name in formats:
        assert 0.0 <= float(rows[name][1].rstrip("%")) <= 100.0
        assert 0.0 <= float(rows[name][2]) <= 100.0  # exact match %
    # Baselines: JPEG at 64 px and at the model's 16 px, and the 4 patches x 32 of the vision encoder in fp16.
    for name in ("image as JPEG, 64 px q75", "image as JPEG, 64 px q95", "image as JPEG, 16 px q75"):
        assert int(rows[name][0].replace(",", "")) > 100 and rows[name][1] == "-"
    assert int(rows["full patch activations (4x32 fp16)"][0]) == HEADER_SIZE + 4 * 32 * 2
    assert re.search(r"^target (met: \S+ at [\d,]+ B/plan|NOT met)", out, re.M)


def test_measures_a_checkpoint(tmp_path, capsys):
    cfg = load_config("debug")
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_model(path, build_model(cfg.model), cfg)
    assert wire.main(["--checkpoint", str(path), "--val-per-class", "1", "--limit", "5", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {path}" in out and "5 held-out images" in out
    assert int(table(out)["fp16"][0]) == HEADER_SIZE + plan_nbytes(4, 32, "fp16")
    with pytest.raises(SystemExit):
        wire.main(["--checkpoint", str(path), "--model.wire_dim=8"])  # overrides only apply to training
