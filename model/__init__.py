"""The VL-JEPA model package: pure PyTorch (torch, numpy, pillow, safetensors; never ray/mlflow/fastapi).

Main names are re-exported lazily, so `import model` or `import model.config` does not pay for
importing torch until a torch-backed name is used:

    from model import load_config, build_model, generate
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Config": "model.config",
    "ConfigError": "model.config",
    "ModelConfig": "model.config",
    "ObjectiveConfig": "model.config",
    "load_config": "model.config",
    "VLJEPA": "model.model",
    "VLJEPAOutput": "model.model",
    "PlanEncoder": "model.model",
    "TextDecoder": "model.model",
    "build_model": "model.model",
    "trainable_parameters": "model.model",
    "generate": "model.generation",
    "caption_images": "model.generation",
    "Objective": "model.objectives",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
