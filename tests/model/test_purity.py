"""model/ is pure PyTorch: importing every submodule pulls in no ray, mlflow or fastapi."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "mlflow", "fastapi")


def test_model_package_imports_no_platform_libraries() -> None:
    modules = sorted(f"model.{p.stem}" for p in (ROOT / "model").glob("*.py") if p.stem != "__init__")
    assert {"model.model", "model.generation", "model.objectives", "model.summary"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in ['model', *{modules!r}]:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_importing_model_config_does_not_import_torch() -> None:
    code = "import sys, model, model.config; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
