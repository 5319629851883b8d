"""One typed config system: dataclasses, named presets, checked overrides.

Every job, the server and the tests build a `Config` through `load_config`:

    cfg = load_config("seed_run2", ["--model.num_latent_vectors=32", "--train.epochs=3"])

An unknown preset or key, or a value that does not parse as the field's type, raises
`ConfigError` naming the valid choices. `Config.to_dict` / `Config.from_dict` round-trip
exactly, so the full config travels inside every checkpoint and MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Conditioning = Literal["cross_attn", "gated", "prefix_film"]
Bottleneck = Literal["plan", "none"]
JepaTarget = Literal["ema_plan", "text"]
VisionBackbone = Literal["scratch", "frozen"]
Precision = Literal["auto", "fp32", "bf16"]

CONDITIONINGS: tuple[str, ...] = typing.get_args(Conditioning)
BOTTLENECKS: tuple[str, ...] = typing.get_args(Bottleneck)


class ConfigError(ValueError):
    """A preset name, override key or value that the config system rejects."""


@dataclass
class ModelConfig:
    """Architecture. Defaults are the log's seed config (16,930,048 params as cross_attn)."""

    embed_dim: int = 256
    num_heads: int = 8
    mlp_ratio: float = 4.0
    encoder_depth: int = 4
    text_encoder_depth: int = 4
    fusion_depth: int = 4
    semantic_predictor_depth: int = 2
    decoder_depth: int = 4
    num_latent_vectors: int = 16  # K: the plan is (K, D)
    image_size: int = 64
    patch_size: int = 8
    vocab_size: int = 260  # 4 specials + 256 byte values
    max_seq_length: int = 128  # text positions, BOS/EOS included
    query_text: str = "describe the image"
    conditioning: Conditioning = "cross_attn"
    bottleneck: Bottleneck = "plan"  # "none": the decoder reads all patch features
    plan_dropout: float = 0.0  # Run 3 (gated): 0.2, training only
    word_dropout: float = 0.0  # Run 4 (prefix_film): 0.3, training only
    gate_init_logit: float = 2.0  # Run 3: sigmoid(2) ~ 0.88, "initialised high"
    vision_backbone: VisionBackbone = "scratch"  # "frozen": vision encoder not trained
    vision_weights: str = ""  # checkpoint to take the vision encoder from (frozen backbone)
    vision_model: str = ""  # "" = the built-in ViT; "timm:<name>" = a timm backbone (model/backbones.py)
    vision_model_weights: str = ""  # timm backbone weights: a local file, "hub" (downloads), or "" (random init)
    # Learned transport projection: the encoder emits (P, wire_dim) plans through a Linear(D, wire_dim)
    # and the decoder expands them with a Linear(wire_dim, D), trained with the model. 0 = off (P, D).
    wire_dim: int = 0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def plan_len(self) -> int:
        """Rows of the plan the decoder reads: K, or every patch without a bottleneck."""
        return self.num_latent_vectors if self.bottleneck == "plan" else self.num_patches

    @property
    def plan_dim(self) -> int:
        """Width of the plan the encoder emits and the decoder reads (what the codec ships): D or wire_dim."""
        return self.wire_dim or self.embed_dim


@dataclass
class ObjectiveConfig:
    """Loss terms; a weight of 0 switches a term off."""

    label_smoothing: float = 0.1
    diversity_weight: float = 0.5  # mean off-diagonal cosine sim of pooled plans
    jepa_weight: float = 0.0
    jepa_target: JepaTarget = "ema_plan"  # EMA encoder's plan, or the caption's text embedding
    jepa_mask_ratio: float = 0.5  # share of patches hidden from the online encoder
    ema_decay: float = 0.996
    infonce_weight: float = 0.0
    infonce_temperature: float = 0.07
    # The log's Run-0 "18-class classification" as a training signal: a linear head on the mean-pooled
    # plan, softmax cross-entropy against the image's instance categories (needs instances annotations).
    category_weight: float = 0.0
    num_categories: int = 91  # head outputs: category ids 0..N-1 (COCO's run 1..90, the shapes set's 1..18)


@dataclass
class DataConfig:
    """Training input built from a prepared Parquet folder."""

    train_split: str = "train"  # sub-folder of the prepared root (prepare writes ROOT/<split>/)
    val_split: str = "val"  # missing: val_fraction of train is held out instead
    max_caption_chars: int = 200
    num_samples: int = 0  # cap on training images; 0 = all
    val_fraction: float = 0.1  # held out when the folder has a single split
    shuffle: Literal["none", "file", "block"] = "file"  # "block" reads every shard before the first batch
    num_cpus_per_map: float = 0.5
    prefetch_batches: int = 2
    # "materialize": decode once into the object store, then each epoch only reshuffles and redraws captions;
    # "stream": read and decode every epoch; "auto": materialise when it fits in half the free object store.
    ingest: Literal["auto", "materialize", "stream"] = "auto"


@dataclass
class TrainConfig:
    """The optimisation recipe and how Ray Train runs it."""

    epochs: int = 100
    batch_size: int = 32  # global: split across workers
    lr: float = 3e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_epochs: int = -1  # -1: min(10, epochs // 5), the log's rule
    seed: int = 0
    precision: Precision = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    node_role: str = ""  # custom resource naming the nodes workers run on (cluster.yaml's train_node); 1 per worker
    keep_checkpoints: int = 2
    max_failures: int = 2
    storage_path: str = ""  # "" = ./runs; any URI Ray Train accepts on a cluster
    run_name: str = ""  # same name again resumes from its latest checkpoint
    eval_samples: int = 8  # sample captions logged per epoch

    def resolved_warmup_epochs(self) -> int:
        return min(10, self.epochs // 5) if self.warmup_epochs < 0 else self.warmup_epochs


@dataclass
class TrackingConfig:
    """MLflow: where runs go and which registered model the result becomes."""

    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "vl-jepa"
    registered_model: str = "vl-jepa-captioner"
    alias: str = "champion"
    enabled: bool = True


@dataclass
class Config:
    """Everything a run needs; stored whole in checkpoints and MLflow runs."""

    preset: str = "seed_run2"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Rebuild a config; unknown keys are errors, missing keys take defaults."""
        return _from_dict(cls, data, prefix="")

    def flat(self) -> dict[str, Any]:
        """`{"model.embed_dim": 256, ...}`: the form MLflow params and sweeps use."""
        out: dict[str, Any] = {"preset": self.preset}
        for section in _SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out

    def validate(self) -> Config:
        """Reject combinations that cannot build or train, naming the offending values."""
        m, o, t = self.model, self.objective, self.train
        problems = []
        if m.embed_dim % m.num_heads:
            problems.append(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
        if m.image_size % m.patch_size:
            problems.append(f"model.image_size={m.image_size} is not divisible by model.patch_size={m.patch_size}")
        for name in ("embed_dim", "num_heads", "num_latent_vectors", "image_size", "patch_size"):
            if getattr(m, name) <= 0:
                problems.append(f"model.{name}={getattr(m, name)} must be positive")
        for name in ("encoder_depth", "text_encoder_depth", "fusion_depth", "semantic_predictor_depth"):
            if getattr(m, name) < 0:
                problems.append(f"model.{name}={getattr(m, name)} must be >= 0")
        if m.decoder_depth <= 0:
            problems.append(f"model.decoder_depth={m.decoder_depth} must be positive")
        if m.vocab_size != 260:
            problems.append(f"model.vocab_size={m.vocab_size}: the byte tokenizer has exactly 260 ids")
        query_tokens = len(m.query_text.encode("utf-8")) + 2
        if m.max_seq_length < max(query_tokens, 4):
            problems.append(
                f"model.max_seq_length={m.max_seq_length} is shorter than the query ({query_tokens} tokens)"
            )
        if m.wire_dim < 0:
            problems.append(f"model.wire_dim={m.wire_dim} must be >= 0 (0 = no transport projection)")
        if m.wire_dim and (o.infonce_weight > 0 or (o.jepa_weight > 0 and o.jepa_target == "text")):
            problems.append(
                f"model.wire_dim={m.wire_dim}: objective.infonce_weight / objective.jepa_target=text compare the "
                f"pooled plan with D={m.embed_dim} text embeddings; the plan is then {m.wire_dim} wide"
            )
        for name in ("plan_dropout", "word_dropout"):
            if not 0.0 <= getattr(m, name) < 1.0:
                problems.append(f"model.{name}={getattr(m, name)} must be in [0, 1)")
        if m.vision_backbone == "frozen" and o.jepa_weight > 0 and o.jepa_target == "ema_plan":
            problems.append(
                "objective.jepa_target=ema_plan needs a trainable vision encoder (model.vision_backbone=frozen)"
            )
        if m.bottleneck == "none" and (o.infonce_weight > 0 or (o.jepa_weight > 0 and o.jepa_target == "text")):
            problems.append(
                f"objective.infonce_weight={o.infonce_weight} / objective.jepa_target={o.jepa_target} embed captions "
                "with the text encoder, which model.bottleneck=none does not build"
            )
        if not 0.0 < o.jepa_mask_ratio < 1.0:
            problems.append(f"objective.jepa_mask_ratio={o.jepa_mask_ratio} must be in (0, 1)")
        if not 0.0 <= o.ema_decay < 1.0:
            problems.append(f"objective.ema_decay={o.ema_decay} must be in [0, 1)")
        for name in ("diversity_weight", "jepa_weight", "infonce_weight", "category_weight"):
            if getattr(o, name) < 0:
                problems.append(f"objective.{name}={getattr(o, name)} must be >= 0")
        if o.num_categories < 2:
            problems.append(f"objective.num_categories={o.num_categories} must be >= 2")
        if o.infonce_temperature <= 0:
            problems.append(f"objective.infonce_temperature={o.infonce_temperature} must be positive")
        if t.num_workers < 1:
            problems.append(f"train.num_workers={t.num_workers} must be >= 1")
        if t.batch_size < t.num_workers:
            problems.append(f"train.batch_size={t.batch_size} is smaller than train.num_workers={t.num_workers}")
        if t.epochs < 1:
            problems.append(f"train.epochs={t.epochs} must be >= 1")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self


_SECTIONS = ("model", "objective", "data", "train", "tracking")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid: {', '.join(sorted(prefix + k for k in known))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", hint, value)
    return cls(**kwargs)


def _check_value(key: str, hint: Any, value: Any) -> Any:
    """Coerce a parsed value to the field type, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is not a boolean (true/false)")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}={value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if hint is str:
        return str(value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in config")
    return value


# ---------------------------------------------------------------------------
# Presets: one per run of the research log, plus a tiny debug flavour for tests.


def _seed(**model: Any) -> Config:
    """The log's seed config (Runs 1-4): D=256, K=16, 64x64, 100 epochs on 20k samples."""
    cfg = Config(model=ModelConfig(**model))
    cfg.data.num_samples = 20_000
    return cfg


def _preset_debug() -> Config:
    cfg = Config(
        model=ModelConfig(
            embed_dim=32,
            num_heads=2,
            encoder_depth=1,
            text_encoder_depth=1,
            fusion_depth=1,
            semantic_predictor_depth=1,
            decoder_depth=1,
            num_latent_vectors=4,
            image_size=16,
            patch_size=8,
            max_seq_length=48,
        ),
    )
    cfg.train.epochs = 2
    cfg.train.batch_size = 8
    cfg.train.lr = 1e-3
    cfg.data.num_samples = 0
    return cfg


def _preset_shapes() -> Config:
    """Run 0: 6 colours x 3 shapes; the smaller model that reached 100% in the log."""
    cfg = Config(
        model=ModelConfig(
            embed_dim=128,
            num_heads=4,
            encoder_depth=2,
            text_encoder_depth=2,
            fusion_depth=2,
            semantic_predictor_depth=2,
            decoder_depth=2,
            num_latent_vectors=8,
            image_size=32,
            patch_size=4,  # the log leaves it open; 8 x 8 = 64 patches, as at the seed config
            max_seq_length=48,
        ),
    )
    # Captioning alone learns colour and stalls before shape: no shape feature is in the plan for the
    # decoder to read, and the decoder gives the encoder no reason to build one (3,000 steps of batch 32:
    # shape still at chance). The log's Run-0 classification as a loss term breaks the stall; patch 4 keeps
    # the spatial detail shape needs; the diversity term at 0.5 collapsed the decoder to 2 captions.
    cfg.objective.diversity_weight = 0.0
    cfg.objective.category_weight = 1.0
    cfg.objective.num_categories = 19  # the set's ids run 1..18
    cfg.train.epochs = 9  # ~2,000 steps on the demo's 7,200 images
    cfg.train.batch_size = 32
    cfg.train.lr = 1e-3
    cfg.data.num_samples = 0
    return cfg


def _preset_seed_run1() -> Config:
    cfg = _seed()
    cfg.train.epochs = 30
    cfg.data.num_samples = 4_000
    return cfg


def _preset_seed_run2() -> Config:
    return _seed()


def _preset_seed_run3() -> Config:
    return _seed(conditioning="gated", plan_dropout=0.2)


def _preset_seed_run4() -> Config:
    return _seed(conditioning="prefix_film", word_dropout=0.3)


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "debug": _preset_debug,
    "shapes": _preset_shapes,
    "seed_run1": _preset_seed_run1,
    "seed_run2": _preset_seed_run2,
    "seed_run3": _preset_seed_run3,
    "seed_run4": _preset_seed_run4,
}


def get_preset(name: str) -> Config:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.preset = name
    return cfg


def parse_overrides(args: typing.Sequence[str]) -> dict[str, str]:
    """`["--model.embed_dim=512", "--train.epochs", "3"]` -> `{"model.embed_dim": "512", ...}`."""
    out: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, value = body, items[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value (use --{body}=VALUE)")
        out[key] = value
        i += 1
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a new config with dotted keys replaced, each checked against its field type."""
    data = cfg.to_dict()
    valid = sorted(k for k in cfg.flat() if k != "preset")
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS or parts[1] not in data[parts[0]]:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        data[parts[0]][parts[1]] = value
    return Config.from_dict(data)


def load_config(preset: str, overrides: typing.Sequence[str] | dict[str, Any] = ()) -> Config:
    """Preset + overrides (CLI strings or a mapping), validated."""
    cfg = get_preset(preset)
    mapping = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return apply_overrides(cfg, mapping).validate()
