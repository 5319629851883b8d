"""The training loss: the log's terms plus the objectives it proposed but never ran.

    loss = ce + diversity_weight * diversity + jepa_weight * jepa + infonce_weight * infonce
           + category_weight * category

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
- category: the log's Run-0 "18-class classification" as a training signal. A linear head reads the
  mean-pooled plan; softmax cross-entropy against the image's instance categories (several categories
  share the target mass equally; images without any are left out of the term). Captioning alone
  learns colour first and then stalls before shape on the Run-0 set: no shape feature is in the plan
  for the decoder to learn to read, and the decoder gives the encoder no reason to make one. This term
  gives the encoder that reason directly (measured in benchmarks/RESULTS.md).

The EMA target and the category head belong to this module, not to VLJEPA, so parameter counts and
model checkpoints do not change (the EMA target never requires gradients; the head is discarded after
training, like a probe). For DDP wrap this module: every trainable parameter of the model then gets a
gradient each step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ObjectiveConfig
from model.model import VLJEPA, TextDecoder
from model.tokenizer import PAD, ByteTokenizer

CE_REFERENCES_PER_IMAGE = 5  # COCO's count: the few images with 6 or 7 references are scored on their first 5
CE_BATCH_SIZE = 64  # (image, reference) pairs per decoder forward in references_ce


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
        self.category_head: nn.Linear | None = None
        if cfg.category_weight > 0:
            self.category_head = nn.Linear(model.cfg.plan_dim, cfg.num_categories)
            nn.init.trunc_normal_(self.category_head.weight, std=0.02)
            nn.init.zeros_(self.category_head.bias)

    @property
    def needs_categories(self) -> bool:
        """True when forward() must be given the batch's categories."""
        return self.category_head is not None

    def forward(
        self,
        images: Tensor,
        caption_ids: Tensor,
        caption_mask: Tensor | None = None,
        categories: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """images (B, 3, S, S), caption_ids (B, T) long, caption_mask (B, T) bool, categories (B, C)
        multi-hot (only with category_weight > 0) -> scalar terms."""
        cfg = self.cfg
        if caption_mask is None:
            caption_mask = caption_ids != PAD
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
        if self.category_head is not None:
            if categories is None or categories.shape != (images.shape[0], cfg.num_categories):
                got = None if categories is None else tuple(categories.shape)
                raise ValueError(
                    f"objective.category_weight > 0 needs categories of shape ({images.shape[0]}, "
                    f"{cfg.num_categories}) (multi-hot, objective.num_categories), got {got}"
                )
            out["category"] = category_loss(self.category_head(plan.mean(1).float()), categories)
            loss = loss + cfg.category_weight * out["category"]
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


def caption_ce(logits: Tensor, caption_ids: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Next-byte CE: logits[:, t] (B, T, V) against ids[:, t + 1]; PAD targets ignored.

    The one teacher-forced cross-entropy: the training loss ("mean" over the batch's target tokens)
    and, through `references_ce`, the validation and evaluation figures ("sum", divided by the
    corpus's token count).
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (T-1), V)
    target = caption_ids[:, 1:].reshape(-1)  # (B * (T-1),)
    return F.cross_entropy(pred.float(), target, ignore_index=PAD, label_smoothing=label_smoothing, reduction=reduction)


@torch.no_grad()
def references_ce(
    decoder: TextDecoder,
    plans: Tensor,
    references: Sequence[Sequence[str]],
    *,
    max_chars: int,
    label_smoothing: Sequence[float] = (0.0,),
    per_image: int = CE_REFERENCES_PER_IMAGE,
) -> tuple[float, ...]:
    """Teacher-forced CE per target token over every (image, reference) pair; one value per smoothing.

    plans (N, P, D): image i's plan reads each of references[i] (the first `per_image`, each cut to
    `max_chars` characters as training cuts them). The mean is over target tokens of the whole set,
    not per batch, so the figure does not depend on how the pairs are batched. Train-time `val_ce`
    and jobs.evaluate's `final_ce` are both this function over PlanEncoder.encode's plans. The
    decoder runs in the mode it is in (call it in eval mode). NaN when there is no target token.
    """
    tokenizer = ByteTokenizer(decoder.max_len)
    device = decoder.head.weight.device
    pairs = [(i, ref[:max_chars]) for i, refs in enumerate(references) for ref in list(refs)[:per_image]]
    totals, tokens = [0.0] * len(label_smoothing), 0
    for start in range(0, len(pairs), CE_BATCH_SIZE):
        chunk = pairs[start : start + CE_BATCH_SIZE]
        ids = tokenizer.batch([text for _, text in chunk])[0].to(device)  # (B, T)
        logits = decoder(plans[[i for i, _ in chunk]].to(device), ids)  # (B, T, V)
        for k, smoothing in enumerate(label_smoothing):
            totals[k] += caption_ce(logits, ids, smoothing, reduction="sum").item()
        tokens += int((ids[:, 1:] != PAD).sum())
    return tuple(total / tokens if tokens else math.nan for total in totals)


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


def category_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax CE of logits (B, C) against multi-hot targets (B, C), each row's mass split equally.

    Rows without a category are left out; with none at all the term is 0 (and still part of the
    graph, so DDP sees the head used).
    """
    targets = targets.float()
    counts = targets.sum(1)  # (B,)
    labelled = counts > 0
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    dist = targets[labelled] / counts[labelled].unsqueeze(1)  # (B', C), rows sum to 1
    return -(dist * F.log_softmax(logits[labelled], dim=-1)).sum(1).mean()


def random_patch_mask(batch: int, num_patches: int, ratio: float) -> Tensor:
    """(B, N) bool with round(ratio * N) True per row (at least 1, at most N - 1), uniformly placed."""
    n_mask = min(max(round(ratio * num_patches), 1), num_patches - 1)
    order = torch.rand(batch, num_patches).argsort(dim=1)  # a random permutation per row
    return order < n_mask
