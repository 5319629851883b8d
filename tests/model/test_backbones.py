"""timm backbones as model.vision_model: build, weights from a local file, checkpoint -> serve halves -> codec.

timm is an optional extra (`pip install '.[timm]'`); without it these tests skip (TIMM_SKIP says why it is
absent on the CPU test machine), except the ones that check the clear error and the config plumbing.
A tiny timm ViT/CNN at random init stands in for a pretrained one: no downloads.
"""

from __future__ import annotations

import pytest
import torch

from model.backbones import BackboneError, timm_name
from model.config import load_config

TINY = {
    "model.embed_dim": 32,
    "model.num_heads": 2,
    "model.image_size": 32,
    "model.patch_size": 8,
    "model.max_seq_length": 48,
}


def test_vision_model_names_are_checked():
    assert timm_name(load_config("debug", TINY).model) is None
    assert timm_name(load_config("debug", {**TINY, "model.vision_model": "timm:resnet18"}).model) == "resnet18"
    with pytest.raises(BackboneError, match="timm:<model name>"):
        timm_name(load_config("debug", {**TINY, "model.vision_model": "resnet18"}).model)


def test_missing_timm_is_a_clear_error():
    try:
        import timm  # noqa: F401
    except Exception:
        from model.model import build_model

        with pytest.raises(BackboneError, match="needs the timm package"):
            build_model(load_config("debug", {**TINY, "model.vision_model": "timm:resnet18"}).model)
    else:
        pytest.skip("timm is installed: the error path is not reachable")


# Why the two timm tests skip on the CPU test machine (checked 2026-11-30 with timm 1.0.31, torchvision 0.28.0).
TIMM_SKIP = (
    "timm not importable: timm hard-imports torchvision; PyPI's torchvision 0.28.0 is built against the CUDA "
    "torch 2.13 and fails beside this CPU torch 2.13.0+cpu ('operator torchvision::nms does not exist'), and "
    "the only working torchvision needs a CUDA torch build, which this CPU machine must never install. "
    "On a cluster/GPU image: pip install -c constraints.txt '.[timm]' (README, 'timm backbones')"
)


def _timm():
    """The timm module, or a skip with TIMM_SKIP (absent, or installed beside a torchvision that cannot load)."""
    try:
        import timm
    except (ImportError, RuntimeError):
        pytest.skip(TIMM_SKIP)
    return timm


@pytest.fixture
def timm_vit_file(tmp_path):
    timm = _timm()
    from safetensors.torch import save_file

    # A tiny ViT at random init, saved as a local "pretrained" file (the model name decides the architecture).
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit.state_dict()


def test_timm_backbone_loads_local_weights_and_round_trips(timm_vit_file, tmp_path):
    from model.backbones import TimmVision, load_backbone_weights
    from model.checkpoint import load_decoder, load_encoder, load_model, save_model
    from model.codec import decode_plan, encode_plan
    from model.generation import generate
    from model.model import build_model

    path, reference = timm_vit_file
    overrides = {
        **TINY,
        "model.vision_model": "timm:vit_tiny_patch16_224",
        "model.vision_model_weights": str(path),
        "model.vision_backbone": "frozen",
    }
    cfg = load_config("debug", overrides)
    model = build_model(cfg.model).eval()
    vision = model.encoder.vision
    assert isinstance(vision, TimmVision) and vision.input_size == 224
    assert load_backbone_weights(vision, cfg.model)
    for name, tensor in reference.items():
        assert torch.equal(vision.backbone.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in vision.backbone.parameters())  # frozen ...
    assert all(p.requires_grad for p in vision.proj.parameters())  # ... its projection to D is not

    images = torch.randn(2, 3, 32, 32)
    patches = vision(images)
    assert patches.shape == (2, (224 // 16) ** 2, 32)  # resized to the backbone's size, prefix dropped

    ckpt = tmp_path / "model.safetensors"
    fingerprint = save_model(ckpt, model, cfg)
    again = load_model(ckpt)
    plan = model.encoder(images)
    assert torch.equal(again.model.encoder(images), plan)
    encoder, decoder = load_encoder(ckpt), load_decoder(ckpt)
    assert encoder.fingerprint == decoder.fingerprint == fingerprint
    with torch.no_grad():
        sent = encoder.module(images[:1])  # (1, K, D)
    wire = encode_plan(sent, fingerprint=fingerprint)
    received = decode_plan(wire, expect_fingerprint=fingerprint)  # (K, D)
    assert received.shape == sent.shape[1:]
    assert torch.allclose(received, sent[0], atol=1e-2)  # fp16 on the wire
    ids = generate(decoder.module, received.unsqueeze(0), max_new_tokens=8)
    assert ids.shape[0] == 1


def test_timm_cnn_feature_map_becomes_patch_rows():
    _timm()
    from model.model import build_model

    cfg = load_config("debug", {**TINY, "model.vision_model": "timm:resnet18"})
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        rows = model.encoder.vision(torch.randn(1, 3, 32, 32))
    assert rows.ndim == 3 and rows.shape[-1] == 32
