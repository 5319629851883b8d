"""Model checkpoints: one safetensors file holding the weights, the full config and a fingerprint.

    save_model(path, model, cfg)  -> fingerprint      atomic: temp file in the same folder, fsync, rename
    load_model(path)              -> LoadedModel      the whole VLJEPA, rebuilt from the stored config
    load_encoder(path)            -> LoadedPart       only the image -> plan half ("encoder.*" tensors)
    load_decoder(path)            -> LoadedPart       only the plan -> text half ("decoder.*" tensors)
    read_config(path)             -> Config           header only, no weights read
    load_vision_weights(...)      -> vision encoder weights for `model.vision_backbone="frozen"`

Loading never unpickles: safetensors stores raw tensor bytes plus a JSON header, so a checkpoint
cannot run code. The metadata carries `format` ("vl-jepa/1"), `config` (Config JSON), `fingerprint`
(see `model_fingerprint`) and any string `extra` the caller adds (epoch, MLflow run id, ...).
Both halves report the fingerprint of the WHOLE model, so an encoder and a decoder loaded from the
same file agree, and the plan codec can refuse plans made by other weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from model.config import Config, ConfigError
from model.model import VLJEPA, PlanEncoder, TextDecoder, build_model

FORMAT = "vl-jepa/1"
CHECKPOINT_FILE = "model.safetensors"  # the one name a checkpoint folder's weights file has (jobs, serve, MLflow)
_RESERVED = ("format", "config", "fingerprint")

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A file that is not a readable VL-JEPA checkpoint, or weights that do not fit the model."""


@dataclass
class LoadedModel:
    model: VLJEPA
    config: Config
    fingerprint: str
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadedPart:
    module: nn.Module  # PlanEncoder or TextDecoder
    config: Config
    fingerprint: str  # of the whole model the part came from
    extra: dict[str, str] = field(default_factory=dict)


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers so names stay canonical."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def model_fingerprint(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 over sorted (name, shape, dtype, raw bytes) of every tensor -> first 16 hex chars."""
    if isinstance(model_or_state_dict, nn.Module):
        state = _unwrap(model_or_state_dict).state_dict()
    else:
        state = model_or_state_dict
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(f"{tuple(t.shape)}|{t.dtype}\0".encode())
        # A byte view works for every dtype (bf16 included), which numpy alone cannot express.
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_model(path: PathLike, model: VLJEPA, cfg: Config, extra: Mapping[str, str] | None = None) -> str:
    """Write weights + config atomically; returns the fingerprint. Only the VLJEPA is stored (no EMA copy)."""
    net = _unwrap(model)
    if not isinstance(net, VLJEPA):
        raise TypeError(f"save_model stores a VLJEPA, got {type(net).__name__}")
    # Contiguous CPU clones: safetensors refuses views and tensors sharing storage (tied weights).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    fingerprint = model_fingerprint(tensors)
    metadata = {"format": FORMAT, "config": cfg.to_json(), "fingerprint": fingerprint}
    for key, value in (extra or {}).items():
        if key in _RESERVED:
            raise ValueError(f"extra metadata key {key!r} is reserved ({', '.join(_RESERVED)})")
        metadata[str(key)] = str(value)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)  # atomic on POSIX and Windows: readers see the old or the new file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return fingerprint


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metadata(path: PathLike) -> dict[str, str]:
    """The checkpoint's metadata (header only), after checking it is a VL-JEPA checkpoint."""
    with _open(path) as f:
        return _checked_metadata(path, f.metadata())


def read_config(path: PathLike) -> Config:
    """The full Config stored in the checkpoint, without reading any weights."""
    return _config_from(path, read_metadata(path))


def load_model(path: PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """Rebuild the VLJEPA from the stored config and load every tensor (strict). Returned in eval mode.

    verify: recompute the fingerprint from the loaded tensors and compare with the stored one,
    which catches bit rot inside tensor data that the file format itself cannot see.
    """
    meta = read_metadata(path)
    cfg = _config_from(path, meta)
    state = _read_tensors(path, prefix="", device=map_location)
    if verify and model_fingerprint(state) != meta["fingerprint"]:
        raise CheckpointError(
            f"{path}: weights do not match the stored fingerprint "
            f"(expected {meta['fingerprint']}, got {model_fingerprint(state)}): the file is corrupt"
        )
    model = build_model(cfg.model)
    _load_strict(path, model, state)
    model.to(map_location).eval()
    return LoadedModel(model=model, config=cfg, fingerprint=meta["fingerprint"], extra=_extra(meta))


def load_encoder(path: PathLike, *, map_location: str | torch.device = "cpu") -> LoadedPart:
    """Only the image -> plan half: a PlanEncoder with the "encoder.*" tensors. Eval mode."""
    return _load_part(path, PlanEncoder, "encoder.", map_location)


def load_decoder(path: PathLike, *, map_location: str | torch.device = "cpu") -> LoadedPart:
    """Only the plan -> text half: a TextDecoder with the "decoder.*" tensors. Eval mode."""
    return _load_part(path, TextDecoder, "decoder.", map_location)


def _load_part(path: PathLike, cls: type[nn.Module], prefix: str, map_location: str | torch.device) -> LoadedPart:
    meta = read_metadata(path)
    cfg = _config_from(path, meta)
    module = cls(cfg.model)
    _load_strict(path, module, _read_tensors(path, prefix=prefix, device=map_location))
    module.to(map_location).eval()
    return LoadedPart(module=module, config=cfg, fingerprint=meta["fingerprint"], extra=_extra(meta))


def load_vision_weights(path: PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The vision encoder's tensors ("encoder.vision.*", prefix stripped) from a checkpoint."""
    read_metadata(path)
    state = _read_tensors(path, prefix="encoder.vision.", device=map_location)
    if not state:
        raise CheckpointError(f"{path}: no encoder.vision.* tensors in this checkpoint")
    return state


def init_vision_from_checkpoint(model: VLJEPA, path: PathLike) -> str:
    """Copy a checkpoint's vision encoder into `model` (for `vision_backbone="frozen"`); returns its fingerprint.

    The two configs must agree on what shapes the vision encoder: embed_dim, num_heads, mlp_ratio,
    encoder_depth, image_size and patch_size; otherwise the error lists each difference.
    """
    src = read_config(path).model
    dst = _unwrap(model).cfg
    keys = ("embed_dim", "num_heads", "mlp_ratio", "encoder_depth", "image_size", "patch_size")
    diffs = [
        f"{k}: checkpoint {getattr(src, k)} vs model {getattr(dst, k)}"
        for k in keys
        if getattr(src, k) != getattr(dst, k)
    ]
    if diffs:
        raise CheckpointError(f"{path}: vision encoder does not fit this model ({'; '.join(diffs)})")
    vision = _unwrap(model).encoder.vision
    device = next(vision.parameters()).device
    _load_strict(path, vision, load_vision_weights(path, map_location=str(device)))
    return read_metadata(path)["fingerprint"]


# ---------------------------------------------------------------------------
# file reading helpers: every failure becomes a CheckpointError naming the file


def _open(path: PathLike, device: str | torch.device = "cpu"):
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as exc:  # SafetensorError: bad header, truncated data, not safetensors at all
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None


def _checked_metadata(path: PathLike, meta: dict[str, str] | None) -> dict[str, str]:
    meta = dict(meta or {})
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected checkpoint format {FORMAT!r}, got {meta.get('format')!r}")
    missing = [k for k in _RESERVED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    return meta


def _config_from(path: PathLike, meta: dict[str, str]) -> Config:
    try:
        return Config.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: stored config is unusable ({exc})") from None


def _extra(meta: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k not in _RESERVED}


def _read_tensors(path: PathLike, *, prefix: str, device: str | torch.device) -> dict[str, Tensor]:
    """Every tensor whose name starts with `prefix`, with the prefix stripped."""
    with _open(path, device) as f:
        try:
            names = [name for name in f.keys() if name.startswith(prefix)]  # noqa: SIM118 (safe_open is no dict)
            return {name[len(prefix) :]: f.get_tensor(name) for name in names}
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor data is unreadable ({exc})") from None


def _load_strict(path: PathLike, module: nn.Module, state: dict[str, Tensor]) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the {type(module).__name__} built from the stored config "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: {exc}") from None
