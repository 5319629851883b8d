"""benchmarks.gpu without a GPU: the CPU fallback runs every measurement on a tiny preset and writes nothing."""

from __future__ import annotations

import pytest

from benchmarks import gpu
from benchmarks.serve_load import RESULTS

TINY = ["--preset", "debug", "--batch", "4", "--steps", "1", "--warmup", "1", "--serve-requests", "2"]


def _rows(out: str) -> dict[str, str]:
    """measurement -> figure, from the markdown table the fallback prints."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[2] == "debug":
            rows[cells[3]] = cells[4]
    return rows


@pytest.mark.slow
def test_cpu_fallback_measures_training_ddp_and_serving(capsys, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)  # also on a machine that has one
    before = RESULTS.read_text()
    assert gpu.main(TINY) == 0
    out = capsys.readouterr().out
    assert "CPU fallback" in out
    rows = _rows(out)
    train = rows["train fp32, batch 4"]
    assert train.endswith("samples/s") and float(train.split()[0]) > 0
    ddp = next(figure for name, figure in rows.items() if name.startswith("train DDP x2 (gloo"))  # 2 processes
    assert float(ddp.split()[0]) > 0
    assert float(rows["serve 1 request (encode + wire + 32 greedy tokens)"].split()[1]) > 0  # "p50 X ms"
    assert float(rows["serve batch 4"].split()[0]) > 0
    assert RESULTS.read_text() == before  # the fallback's figures never land in RESULTS.md
