"""Pretrained vision backbones from timm, as a drop-in for the built-in ViT (`VisionEncoder`).

    model.vision_model = "timm:vit_tiny_patch16_224"     # or "timm:resnet18", any timm model name
    model.vision_model_weights = "/models/vit_tiny.safetensors"   # or "hub" (downloads; clusters only), or ""
    model.vision_backbone = "frozen"                    # or "scratch": the backbone is fine-tuned

`TimmVision` has the VisionEncoder's interface, `forward_features(images, patch_mask) -> (B, N, D)`:

    images (B, 3, S, S), ImageNet-normalised by the one transform (model/transform.py)
      -> re-normalised to the backbone's own mean/std (pretrained_cfg; an exact per-channel affine)
      -> resized to the backbone's input size when it differs from S (pretrained_cfg["input_size"])
      -> timm forward_features: (B, prefix + N, C) for ViTs (prefix tokens dropped), (B, C, H, W) for CNNs
      -> (B, N, C) -> Linear C -> D (`proj`, always trained): (B, N, D)

So the data pipeline and serving keep one transform, and the backbone still sees what it was trained on.
Building never reads files (checkpoints rebuild the module from the config, then load their tensors);
`load_backbone_weights` reads `vision_model_weights` for a fresh training run. timm is imported only
when a timm backbone is asked for: the default install does not need it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.transform import IMAGENET_MEAN, IMAGENET_STD

PREFIX = "timm:"


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded (timm missing, unknown name, weights that do not fit)."""


def timm_name(cfg: ModelConfig) -> str | None:
    """The timm model name of `cfg.vision_model`, or None for the built-in ViT."""
    if not cfg.vision_model:
        return None
    if not cfg.vision_model.startswith(PREFIX) or len(cfg.vision_model) == len(PREFIX):
        raise BackboneError(f"model.vision_model={cfg.vision_model!r}: use '' or 'timm:<model name>'")
    return cfg.vision_model[len(PREFIX) :]


def _timm():
    try:
        import timm
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise BackboneError(
            f"model.vision_model needs the timm package (pip install 'vl-jepa-platform[timm]'): {exc}"
        ) from None
    return timm


class TimmVision(nn.Module):
    """A timm backbone + a Linear to the model width; see the module docstring for the data flow."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        name = timm_name(cfg)
        timm = _timm()
        try:
            self.backbone = timm.create_model(name, pretrained=False, num_classes=0)
        except Exception as exc:  # RuntimeError "Unknown model" and friends
            raise BackboneError(f"model.vision_model={cfg.vision_model!r}: {exc}") from None
        pcfg = dict(getattr(self.backbone, "pretrained_cfg", {}) or {})
        mean = torch.tensor(pcfg.get("mean", tuple(IMAGENET_MEAN)), dtype=torch.float32)
        std = torch.tensor(pcfg.get("std", tuple(IMAGENET_STD)), dtype=torch.float32)
        # x_backbone = (x_imagenet * std_in + mean_in - mean) / std = x * scale + shift, per channel
        scale = torch.from_numpy(IMAGENET_STD) / std
        shift = (torch.from_numpy(IMAGENET_MEAN) - mean) / std
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.image_size = cfg.image_size
        self.input_size = int(pcfg.get("input_size", (3, cfg.image_size, cfg.image_size))[-1])
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.proj = nn.Linear(self.backbone.num_features, cfg.embed_dim)

    def forward_features(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        if patch_mask is not None:
            raise BackboneError("masked views (objective.jepa_target=ema_plan) need the built-in ViT")
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        x = images * self.scale + self.shift  # the backbone's own normalisation
        if self.input_size != self.image_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        feats = self.backbone.forward_features(x)
        if feats.ndim == 4:  # CNN: (B, C, H, W) -> (B, H * W, C)
            feats = feats.flatten(2).transpose(1, 2)
        else:  # ViT: (B, prefix + N, C) -> (B, N, C)
            feats = feats[:, self.num_prefix_tokens :]
        return self.proj(feats)  # (B, N, D)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        return self.forward_features(images, patch_mask)


def load_backbone_weights(vision: nn.Module, cfg: ModelConfig) -> bool:
    """Load `cfg.vision_model_weights` into a TimmVision's backbone; returns whether anything was loaded.

    A path: a safetensors file or a torch state dict (weights only) with the backbone's tensor names
    (classifier tensors are ignored). "hub": timm's own pretrained weights (needs the internet).
    """
    source = cfg.vision_model_weights
    if not source or not isinstance(vision, TimmVision):
        return False
    if source == "hub":
        state = _timm().create_model(timm_name(cfg), pretrained=True, num_classes=0).state_dict()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"model.vision_model_weights: no such file {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    expected = vision.backbone.state_dict()
    state = {k: v for k, v in state.items() if k in expected}  # drop a classifier head the file may hold
    missing = sorted(set(expected) - set(state))
    if missing:
        raise BackboneError(f"{source}: backbone weights miss {missing[:5]} ({len(missing)} tensors)")
    try:
        vision.backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise BackboneError(f"{source}: {exc}") from None
    return True


def build_vision(cfg: ModelConfig) -> nn.Module | None:
    """A TimmVision for `timm:` names; None for the built-in ViT (the caller builds it)."""
    if timm_name(cfg) is None:
        return None
    if cfg.bottleneck == "none":
        raise BackboneError("model.bottleneck=none sizes the plan by the built-in ViT's patches; use a plan with timm")
    return TimmVision(cfg)
