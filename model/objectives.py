"""The training loss: the log's terms plus the objectives it proposed but never ran.

    loss = ce + diversity_weight * diversity + jepa_weight * jepa + infonce_weight * infonce

- ce: next-byte cross-entropy, PAD targets ignored, label smoothing.
- diversity: mean off-diagonal cosine similarity of the mean-pooled plans in the batch (the log's
  anti-collapse term; lower = more varied plans). Always reported, added only with a weight.
- jepa (objective.jepa_target):
    "ema_plan": the online encoder sees a masked view (a random jepa_mask_ratio share of patches has
        its embedding zeroed) and predicts, by mean squared error, the plan that an EMA copy of the
        encoder half computes from the full image (no gradient into the target).
    "text": the full-view pooled plan predicts the caption's pooled text-encoder embedding
        (no gradient into the target), by squared distance of the L2-normalised vectors.
- infonce: symmetric InfoNCE between pooled plans and pooled caption embeddings; the other rows of
  the batch are the negatives; temperature objective.infonce_temperature.

The terms have no parameters. The EMA target belongs to this module, not to VLJEPA, so parameter
counts and model checkpoints do not change; its parameters never require gradients. For DDP wrap
this module: every trainable parameter of the model then gets a gradient each step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ObjectiveConfig
from model.model import PAD_ID, VLJEPA


class Objective(nn.Module):
    """Computes the configured loss terms for one batch; owns the EMA target encoder when needed."""

    def __init__(self, model: VLJEPA, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        needs_text = cfg.infonce_weight > 0 or (cfg.jepa_weight > 0 and cfg.jepa_target == "text")
        if needs_text and model.encoder.text is None:
            raise ValueError(
                "objective.infonce_weight > 0 and objective.jepa_target=text embed captions with the text "
                "encoder, which model.bottleneck=none does not build"
            )
        self.ema_encoder: nn.Module | None = None
        if cfg.jepa_weight > 0 and cfg.jepa_target == "ema_plan":
            self.ema_encoder = copy.deepcopy(model.encoder).requires_grad_(False).eval()

    def forward(self, images: Tensor, caption_ids: Tensor, caption_mask: Tensor | None = None) -> dict[str, Tensor]:
        """images (B, 3, S, S), caption_ids (B, T) long, caption_mask (B, T) bool -> scalar terms."""
        cfg = self.cfg
        if caption_mask is None:
            caption_mask = caption_ids != PAD_ID
        logits, plan = self.model(images, caption_ids)  # (B, T, V), (B, P, D)
        out = {"ce": caption_ce(logits, caption_ids, cfg.label_smoothing)}
        out["diversity"] = plan_diversity(plan)
        loss = out["ce"] + cfg.diversity_weight * out["diversity"] if cfg.diversity_weight else out["ce"]
        if cfg.jepa_weight > 0:
            out["jepa"] = self._jepa(images, plan, caption_ids, caption_mask)
            loss = loss + cfg.jepa_weight * out["jepa"]
        if cfg.infonce_weight > 0:
            text = self.model.encoder.text.pooled(caption_ids, caption_mask)  # (B, D)
            out["infonce"] = info_nce(plan.mean(1), text, cfg.infonce_temperature)
            loss = loss + cfg.infonce_weight * out["infonce"]
        out["loss"] = loss
        return out

    def _jepa(self, images: Tensor, plan: Tensor, caption_ids: Tensor, caption_mask: Tensor) -> Tensor:
        encoder = self.model.encoder
        if self.cfg.jepa_target == "text":
            with torch.no_grad():
                target = encoder.text.pooled(caption_ids, caption_mask)  # (B, D)
            pred = F.normalize(plan.mean(1), dim=-1)
            return (pred - F.normalize(target, dim=-1)).pow(2).sum(-1).mean()
        patch_mask = random_patch_mask(images.shape[0], encoder.vision.pos_embed.shape[1], self.cfg.jepa_mask_ratio)
        pred = encoder(images, patch_mask.to(images.device))  # (B, P, D) from the masked view
        with torch.no_grad():
            target = self.ema_encoder(images)  # (B, P, D) from the full view
        return F.mse_loss(pred, target)

    @torch.no_grad()
    def update_ema(self) -> None:
        """target <- decay * target + (1 - decay) * online; call after each optimizer step."""
        if self.ema_encoder is None:
            return
        decay = self.cfg.ema_decay
        online = self.model.encoder
        for target, param in zip(self.ema_encoder.parameters(), online.parameters(), strict=True):
            target.lerp_(param.detach(), 1.0 - decay)
        for target, buf in zip(self.ema_encoder.buffers(), online.buffers(), strict=True):
            target.copy_(buf)

    def train(self, mode: bool = True) -> Objective:
        super().train(mode)
        if self.ema_encoder is not None:
            self.ema_encoder.eval()  # the target never runs in training mode
        return self


def caption_ce(logits: Tensor, caption_ids: Tensor, label_smoothing: float) -> Tensor:
    """Next-byte CE: logits[:, t] (B, T, V) against ids[:, t + 1]; PAD targets ignored."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (T-1), V)
    target = caption_ids[:, 1:].reshape(-1)  # (B * (T-1),)
    return F.cross_entropy(pred.float(), target, ignore_index=PAD_ID, label_smoothing=label_smoothing)


def plan_diversity(plan: Tensor) -> Tensor:
    """Mean off-diagonal cosine similarity of mean-pooled plans (B, P, D); 0 for a batch of one."""
    B = plan.shape[0]
    if B < 2:
        return plan.sum() * 0.0
    z = F.normalize(plan.mean(1).float(), dim=-1)  # (B, D)
    sim = z @ z.T  # (B, B)
    off_diag = sim.sum() - sim.diagonal().sum()
    return off_diag / (B * (B - 1))


def info_nce(image: Tensor, text: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE over a batch of paired (B, D) embeddings; row i of each is the positive pair."""
    a = F.normalize(image.float(), dim=-1)
    b = F.normalize(text.float(), dim=-1)
    logits = a @ b.T / temperature  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def random_patch_mask(batch: int, num_patches: int, ratio: float) -> Tensor:
    """(B, N) bool with round(ratio * N) True per row (at least 1, at most N - 1), uniformly placed."""
    n_mask = min(max(round(ratio * num_patches), 1), num_patches - 1)
    order = torch.rand(batch, num_patches).argsort(dim=1)  # a random permutation per row
    return order < n_mask
