"""The VL-JEPA latent-plan captioner, exactly as docs/model-spec.md lists it.

Data flow (shapes at the seed config: B batch, N=64 patches, S=20 query tokens, K=16, D=256, V=260):

    images (B, 3, 64, 64) -> VisionEncoder -> patches (B, N, D)
    query prompt (1, S)   -> TextEncoder   -> (1, S, D), shared by every row
    Fusion: query tokens cross-attend to the patches           -> (B, S, D)
    SemanticPredictor: K learned queries read the fused tokens -> plan (B, K, D)
    TextDecoder: plan + caption ids (B, T) -> logits (B, T, V)

With `bottleneck="none"` (the control the log never ran) the plan IS the patch features
(B, N, D): the text encoder, fusion and predictor are not built at all, so the control's
parameter count is vision + decoder and every built parameter receives a gradient (DDP needs
no `find_unused_parameters`). Objectives that embed captions with the text encoder
(InfoNCE, JEPA with the text target) therefore need `bottleneck="plan"`.

The decoder reads the plan through one of three conditioning variants (cross_attn, gated,
prefix_film); see `DecoderBlock` and `TextDecoder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbones import build_vision
from model.config import ModelConfig
from model.tokenizer import BOS, EOS, NUM_SPECIALS

ENCODE_BATCH_SIZE = 64  # images per forward in PlanEncoder.encode (evaluation, training-time validation)


# ---------------------------------------------------------------------------
# Leaf modules


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear; optional key/value cache."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        B, T, D = x.shape
        # (B, T, 3D) -> 3 x (B, H, T, hd)
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, past + T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    """Queries from `x` attend to a context; separate q, k, v, out Linears and no norm of its own."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, D) -> keys and values (B, H, L, hd); the decoder computes them once per plan."""
        B, L, D = context.shape
        k = self.k(context).view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)
        v = self.v(context).view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, context: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, D = x.shape
        k, v = kv if kv is not None else self.project_kv(context)
        q = self.q(x).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Linear D -> hidden, GELU, Linear hidden -> D."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FiLM(nn.Module):
    """Scale and shift from a conditioning vector; the identity at init (weight 0, scale 1, shift 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)

    def reset_identity(self) -> None:
        nn.init.zeros_(self.proj.weight)
        dim = self.proj.out_features // 2
        with torch.no_grad():
            self.proj.bias[:dim].fill_(1.0)
            self.proj.bias[dim:].zero_()

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.proj(cond).unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, D)
        return h * scale + shift


class KVCache:
    """Keys/values of one self-attention layer: (B, H, max_len, hd), filled left to right.

    Allocated on the first append, with that call's dtype and device (autocast-friendly).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            B, H, _, hd = k.shape
            self.k, self.v = k.new_empty(B, H, self.max_len, hd), v.new_empty(B, H, self.max_len, hd)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.max_len}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


# ---------------------------------------------------------------------------
# Blocks


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + mlp(LN(x)). 789,760 params at D=256."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class FusionBlock(nn.Module):
    """Query tokens cross-attend to image patches (residual), then one Block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.block = Block(dim, num_heads, mlp_ratio)

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        x = x + self.cross_attn(self.norm_q(x), self.norm_kv(image))  # (B, S, D)
        return self.block(x)


class PlanContext(NamedTuple):
    """What every decoder block needs from the plan, computed once per plan."""

    plan: Tensor  # (B, P, D), after plan dropout
    cond: Tensor  # (B, D) mean-pooled plan: FiLM input
    bias: Tensor | None  # (B, 1, D) plan_bias output (gated only)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the plan, MLP; each pre-norm with a residual.

    cross_attn: the plain block. gated: the cross branch is (out + plan_bias) * sigmoid(cross_gate).
    prefix_film: FiLM(plan) modulates the LayerNorm outputs before self-attention and before the MLP.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.conditioning = cfg.conditioning
        self.norm1 = nn.LayerNorm(D)
        self.attn = Attention(D, cfg.num_heads)
        self.norm_cross = nn.LayerNorm(D)
        self.norm_plan = nn.LayerNorm(D)
        self.cross_attn = CrossAttention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        if cfg.conditioning == "gated":
            self.cross_gate = nn.Parameter(torch.full((), cfg.gate_init_logit))
        if cfg.conditioning == "prefix_film":
            self.film1 = FiLM(D)
            self.film2 = FiLM(D)

    def plan_kv(self, plan: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values of the plan: 2 x (B, H, P, hd)."""
        return self.cross_attn.project_kv(self.norm_plan(plan))

    def forward(
        self,
        x: Tensor,
        plan_kv: tuple[Tensor, Tensor],
        ctx: PlanContext,
        mask: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        film = self.conditioning == "prefix_film"
        h = self.norm1(x)
        if film:
            h = self.film1(h, ctx.cond)
        x = x + self.attn(h, mask, cache)
        cross = self.cross_attn(self.norm_cross(x), kv=plan_kv)  # (B, T, D)
        if self.conditioning == "gated":
            cross = torch.sigmoid(self.cross_gate) * (cross + ctx.bias)
        x = x + cross
        h = self.norm2(x)
        if film:
            h = self.film2(h, ctx.cond)
        return x + self.mlp(h)


# ---------------------------------------------------------------------------
# Encoders


class VisionEncoder(nn.Module):
    """ViT: conv patch embedding, learned (2-D sin-cos initialised) positions, Blocks, LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, D))
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.encoder_depth))
        self.norm = nn.LayerNorm(D)

    def forward_features(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images (B, 3, S, S) -> (B, N, D). patch_mask (B, N) bool: True patches are zeroed (JEPA view)."""
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if patch_mask is not None:
            # Hide content but keep position: zero the embedding before the position is added.
            x = x.masked_fill(patch_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        return self.forward_features(images, patch_mask)


class TextEncoder(nn.Module):
    """Token + learned (1-D sin-cos initialised) positions, Blocks with padding masked, LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.max_len = cfg.max_seq_length
        self.tok_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_seq_length, D))
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.text_encoder_depth))
        self.norm = nn.LayerNorm(D)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids (B, T) long, mask (B, T) bool (True = token) -> (B, T, D)."""
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text of {length} tokens exceeds max_seq_length={self.max_len}")
        x = self.tok_embed(ids) + self.pos_embed[:, :length]  # (B, T, D)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T): keys that exist
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)

    def pooled(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Masked mean over tokens: (B, D)."""
        x = self(ids, mask)
        if mask is None:
            return x.mean(1)
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class Fusion(nn.Module):
    """FusionBlocks (query tokens read the image), then LayerNorm: (B, S, D)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.blocks = nn.ModuleList(FusionBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.fusion_depth))
        self.norm = nn.LayerNorm(D)

    def forward(self, query: Tensor, image: Tensor) -> Tensor:
        x = query
        for block in self.blocks:
            x = block(x, image)
        return self.norm(x)


class SemanticPredictor(nn.Module):
    """Blocks over the fused tokens; K learned queries read them once (no residual, no MLP); LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.semantic_predictor_depth))
        self.queries = nn.Parameter(torch.zeros(1, cfg.num_latent_vectors, D))
        self.cross_attn = CrossAttention(D, cfg.num_heads)
        self.norm = nn.LayerNorm(D)

    def forward(self, fused: Tensor) -> Tensor:
        x = fused
        for block in self.blocks:
            x = block(x)  # (B, S, D)
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, K, D)
        return self.norm(self.cross_attn(q, x))  # (B, K, D): the latent plan


def query_token_ids(text: str) -> list[int]:
    """The fixed prompt as byte-tokenizer ids: [BOS, bytes + 4, EOS]."""
    return [BOS, *(b + NUM_SPECIALS for b in text.encode("utf-8")), EOS]


class PlanEncoder(nn.Module):
    """The encoder half: images -> plan (B, P, D). P = K, or N patches when bottleneck == "none"."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.bottleneck = cfg.bottleneck
        self.vision = build_vision(cfg) or VisionEncoder(cfg)  # a timm backbone (model/backbones.py) or the ViT
        self.text: TextEncoder | None = None
        self.fusion: Fusion | None = None
        self.predictor: SemanticPredictor | None = None
        if cfg.bottleneck == "plan":
            self.text = TextEncoder(cfg)
            self.fusion = Fusion(cfg)
            self.predictor = SemanticPredictor(cfg)
        # The transport projection (model.wire_dim): what crosses the wire is (B, P, wire_dim).
        self.wire_down = nn.Linear(cfg.embed_dim, cfg.wire_dim) if cfg.wire_dim else None
        # Not persistent: rebuilt from cfg.query_text, so it never appears in checkpoints.
        self.register_buffer("query_ids", torch.tensor([query_token_ids(cfg.query_text)]), persistent=False)
        self._query_cache: tuple[tuple, Tensor] | None = None  # (weights key, (1, S, D)): see query_encoding

    def query_encoding(self) -> Tensor:
        """The fixed query prompt through the text encoder: (1, S, D), the same for every image.

        With gradients on (training) it is computed on every call, so the text encoder learns. Without
        them (evaluation, serving, the EMA target) it is cached, keyed by the device, the autocast state
        and each text-encoder parameter's storage and version counter: any change of the weights (an
        optimizer step, the EMA's lerp_, load_state_dict, .to()) recomputes it on the next call.
        """
        params = list(self.text.parameters())
        if torch.is_grad_enabled() or any(p.is_inference() for p in params):
            # Training, or weights made under inference_mode (no version counter to key a cache by).
            return self.text(self.query_ids)
        device = self.query_ids.device
        key = (
            device,
            torch.is_autocast_enabled(device.type),
            *((p.data_ptr(), p._version) for p in params),
        )
        if self._query_cache is None or self._query_cache[0] != key:
            # Outside inference mode, so the cached tensor stays usable by plain no_grad callers too.
            with torch.inference_mode(False), torch.no_grad():
                self._query_cache = (key, self.text(self.query_ids))
        return self._query_cache[1]

    @torch.no_grad()
    def encode(self, images: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Inference: images (N, 3, S, S) -> plans (N, P, plan width) on this encoder's device.

        `batch_size` images per forward, the query encoding cached: the one encoder forward that
        jobs.evaluate, the training-time validation and the Serve PlanEncoder run.
        """
        device = self.query_ids.device
        chunks = [self(images[i : i + batch_size].to(device)) for i in range(0, max(len(images), 1), batch_size)]
        return torch.cat(chunks)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        patches = self.vision(images, patch_mask)  # (B, N, D)
        if self.bottleneck == "none":
            return self.to_wire(patches)
        query = self.query_encoding()  # (1, S, D): the prompt is the same for every row
        fused = self.fusion(query.expand(images.shape[0], -1, -1), patches)  # (B, S, D)
        return self.to_wire(self.predictor(fused))  # (B, K, plan_dim)

    def to_wire(self, plan: Tensor) -> Tensor:
        """(B, P, D) -> (B, P, plan_dim): the learned projection down to model.wire_dim, if any."""
        return plan if self.wire_down is None else self.wire_down(plan)


# ---------------------------------------------------------------------------
# Decoder


@dataclass
class DecoderState:
    """Incremental decoding state: plan context, per-block plan keys/values and self-attention caches."""

    ctx: PlanContext
    plan_kv: list[tuple[Tensor, Tensor]]
    caches: list[KVCache]
    text_len: int = 0  # text tokens consumed so far


class TextDecoder(nn.Module):
    """Autoregressive byte decoder conditioned on the plan; returns logits for text positions only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.conditioning = cfg.conditioning
        self.max_len = cfg.max_seq_length
        self.plan_len = cfg.plan_len
        self.prefix_len = cfg.plan_len if cfg.conditioning == "prefix_film" else 0
        self.word_dropout = cfg.word_dropout
        self.plan_dropout = cfg.plan_dropout
        self.tok_embed = nn.Embedding(cfg.vocab_size, D)
        # Prefix rows (if any) come first in the position table: (1, P + max_seq_length, D).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix_len + cfg.max_seq_length, D))
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.plan_bias = nn.Linear(D, D) if cfg.conditioning == "gated" else None
        self.plan_to_prefix = nn.Linear(D, D) if cfg.conditioning == "prefix_film" else None
        self.plan_dim = cfg.plan_dim
        # The transport projection's other half: (B, P, wire_dim) -> (B, P, D), trained with the model.
        self.wire_up = nn.Linear(cfg.wire_dim, D) if cfg.wire_dim else None

    def context(self, plan: Tensor) -> PlanContext:
        """Expand a wire_dim plan, plan dropout (training only), the pooled plan and the gated bias."""
        if plan.ndim != 3 or plan.shape[1] != self.plan_len or plan.shape[2] != self.plan_dim:
            width = f"D={self.plan_dim}" + ("" if self.wire_up is None else " (model.wire_dim)")
            raise ValueError(f"plan must be (B, {self.plan_len}, D) with {width}, got {tuple(plan.shape)}")
        if self.wire_up is not None:
            plan = self.wire_up(plan)  # (B, P, wire_dim) -> (B, P, D)
        if self.training and self.plan_dropout > 0:
            plan = F.dropout(plan, self.plan_dropout)
        cond = plan.mean(1)  # (B, D)
        bias = self.plan_bias(cond).unsqueeze(1) if self.plan_bias is not None else None  # (B, 1, D)
        return PlanContext(plan, cond, bias)

    def _embed(self, ids: Tensor, ctx: PlanContext, text_start: int) -> Tensor:
        """Token embeddings (+ the prefix before the first text token) with positions: (B, L, D)."""
        P, T = self.prefix_len, ids.shape[1]
        x = self.tok_embed(ids)  # (B, T, D)
        if self.training and self.word_dropout > 0:
            # Word dropout: whole token embeddings vanish, so the LM prior becomes unreliable.
            keep = torch.rand(x.shape[:2], device=x.device) >= self.word_dropout
            x = x * keep.unsqueeze(-1).to(x.dtype)
        x = x + self.pos_embed[:, P + text_start : P + text_start + T]
        if P and text_start == 0:
            prefix = self.plan_to_prefix(ctx.plan) + self.pos_embed[:, :P]  # (B, P, D)
            x = torch.cat([prefix, x], dim=1)
        return x

    def _mask(self, start: int, end: int, device: torch.device) -> Tensor | None:
        """Bool (end - start, end): every position sees the whole prefix; text is causal."""
        if end - start == 1:
            return None  # one new query sees every cached position
        q = torch.arange(start, end, device=device).unsqueeze(1)
        k = torch.arange(end, device=device).unsqueeze(0)
        return (k < self.prefix_len) | (k <= q)

    def _check_len(self, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"text of {end} tokens exceeds max_seq_length={self.max_len}")

    def forward(self, plan: Tensor, ids: Tensor) -> Tensor:
        """Teacher forcing: plan (B, P, D), ids (B, T) -> logits (B, T, V); logits[:, t] predicts ids[:, t+1]."""
        self._check_len(ids.shape[1])
        ctx = self.context(plan)
        x = self._embed(ids, ctx, 0)  # (B, prefix + T, D)
        mask = self._mask(0, x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, block.plan_kv(ctx.plan), ctx, mask)
        return self.head(self.norm(x[:, self.prefix_len :]))

    def init_state(self, plan: Tensor, max_text_len: int) -> DecoderState:
        """Prepare incremental decoding of up to `max_text_len` text tokens."""
        self._check_len(max_text_len)
        ctx = self.context(plan)
        caches = [KVCache(self.prefix_len + max_text_len) for _ in self.blocks]
        return DecoderState(ctx, [block.plan_kv(ctx.plan) for block in self.blocks], caches)

    def step(self, ids: Tensor, state: DecoderState) -> Tensor:
        """Feed the next text tokens (B, t) through the cache -> their logits (B, t, V)."""
        start_text = state.text_len
        self._check_len(start_text + ids.shape[1])
        x = self._embed(ids, state.ctx, start_text)  # (B, t [+ P on the first call], D)
        start = 0 if start_text == 0 else self.prefix_len + start_text
        mask = self._mask(start, start + x.shape[1], x.device)
        for block, kv, cache in zip(self.blocks, state.plan_kv, state.caches, strict=True):
            x = block(x, kv, state.ctx, mask, cache)
        state.text_len += ids.shape[1]
        return self.head(self.norm(x[:, x.shape[1] - ids.shape[1] :]))


# ---------------------------------------------------------------------------
# The whole model


class VLJEPAOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    plan: Tensor  # (B, P, D)


class VLJEPA(nn.Module):
    """Encoder half (image -> plan) + decoder half (plan -> text)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PlanEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.apply(_init_weights)
        if cfg.vision_backbone == "frozen":
            # a timm backbone freezes; its projection to D still trains
            getattr(self.encoder.vision, "backbone", self.encoder.vision).requires_grad_(False)

    def forward(self, images: Tensor, caption_ids: Tensor) -> VLJEPAOutput:
        plan = self.encoder(images)  # (B, P, D)
        return VLJEPAOutput(self.decoder(plan, caption_ids), plan)


def build_model(cfg: ModelConfig) -> VLJEPA:
    """A freshly initialised model. Never reads files: for a frozen backbone with `vision_weights`, the
    trainer calls `model.checkpoint.init_vision_from_checkpoint(model, cfg.vision_weights)`."""
    return VLJEPA(cfg)


def trainable_parameters(module: nn.Module) -> int:
    """Number of parameters with requires_grad (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# Initialisation: nanoGPT-style small normals, then the spec's special cases.


def sincos_1d(length: int, dim: int) -> Tensor:
    """(length, dim) sin-cos table; an odd last column stays zero."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = torch.arange(length, dtype=torch.float64).unsqueeze(1) * freqs  # (length, half)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, :half] = angles.sin()
    table[:, half : 2 * half] = angles.cos()
    return table.float()


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid * grid, dim): half the channels encode the row, half the column (row-major patches)."""
    dim_h = dim // 2
    rows = sincos_1d(grid, dim_h)  # (grid, dim_h)
    cols = sincos_1d(grid, dim - dim_h)  # (grid, dim - dim_h)
    return torch.cat([rows.repeat_interleave(grid, 0), cols.repeat(grid, 1)], dim=1)


def _init_weights(module: nn.Module) -> None:
    """Used with `Module.apply`, which visits children before parents, so parents override."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:  # timm CNNs have bias-free convolutions
            nn.init.zeros_(module.bias)
    elif isinstance(module, FiLM):
        module.reset_identity()
    elif isinstance(module, VisionEncoder):
        with torch.no_grad():
            module.pos_embed.copy_(sincos_2d(module.grid, module.pos_embed.shape[-1]).unsqueeze(0))
    elif isinstance(module, (TextEncoder, TextDecoder)):
        with torch.no_grad():
            module.pos_embed.copy_(sincos_1d(*module.pos_embed.shape[1:]).unsqueeze(0))
    elif isinstance(module, SemanticPredictor):
        nn.init.normal_(module.queries, std=0.02)
