"""Contrastive losses of image-text pairs as plain functions of tensors, and the all-gather that feeds them.

Both losses score *rows* (this process's pairs) against *columns* (by default the same pairs; under DDP/FSDP every
rank's pairs, gathered with `gather_features`). Row i's positive is column `offset + i`. With each rank's loss the
mean over its own rows, the mean of the ranks' losses is the loss of the global batch, and so is the gradient once
DDP/FSDP average the ranks' gradients (the gather's backward sums the columns' gradients back to their rank).

    image, text = model.encode_image(pixels), model.encode_text(ids, mask)      # L2-normalised, (B, D)
    all_image, offset = gather_features(image)
    all_text, _ = gather_features(text)
    loss = contrastive_loss(image, text, scale, all_image, all_text, offset)

`distributed_loss(kind, image, text, scale, bias)` does exactly that for either loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP: temperature 0.07
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP: the multiplier is clamped at 100
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # SigLIP: t' = log 10
SIGLIP_INIT_LOGIT_BIAS = -10.0  # SigLIP: b = -10


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_cols: torch.Tensor | None = None,
    text_cols: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropy over the similarity matrix.

    image_emb, text_emb: (B, D) L2-normalised rows, pair i = (image_emb[i], text_emb[i]).
    logit_scale: the multiplier itself (exp of the learned log-scale), a scalar or a [1] tensor.
    image_cols, text_cols: (G, D) the columns to score against (default: the rows themselves); row i's positive is
    column offset + i. Returns the mean over the B rows of (CE_image->text + CE_text->image) / 2.
    """
    image_cols = image_emb if image_cols is None else image_cols
    text_cols = text_emb if text_cols is None else text_cols
    _check(image_emb, text_emb, image_cols, text_cols, offset)
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    logits_per_image = logit_scale * image_emb @ text_cols.t()  # (B, G)
    logits_per_text = logit_scale * text_emb @ image_cols.t()  # (B, G)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    text_cols: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: -sum_ij log sigmoid(z_ij * (scale * x_i.y_j + bias)) / B, z = +1 on pairs.

    Every (image row, text column) pair is one binary problem; rows are this rank's images, columns all texts
    (`text_cols`, default the rows' own texts); row i's positive is column offset + i. Divided by the number of rows,
    so over gathered columns the mean of the ranks' losses is the global batch's loss.
    """
    text_cols = text_emb if text_cols is None else text_cols
    _check(image_emb, text_emb, text_cols, text_cols, offset)
    rows = image_emb.shape[0]
    logits = logit_scale * image_emb @ text_cols.t() + logit_bias  # (B, G)
    signs = -torch.ones_like(logits)
    signs[torch.arange(rows, device=logits.device), torch.arange(rows, device=logits.device) + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / rows


def gather_features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated in rank order, differentiable; and the offset of this rank's rows in it.

    Gradients flowing into the gathered tensor are summed back to the rank that owns each row. Without an initialised
    process group (or with one process) it returns (x, 0). Every rank must pass the same number of rows.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed import _functional_collectives as fc

    # newer torch calls it all_gather_single_autograd; the older name warns that it is deprecated
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    gathered = gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
    return gathered, dist.get_rank() * x.shape[0]


def distributed_loss(
    kind: str,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's pairs scored against every rank's (`kind`: "clip" or "siglip"); the plain loss in one process."""
    if kind == "clip":
        image_cols, offset = gather_features(image_emb)
        text_cols, _ = gather_features(text_emb)
        return contrastive_loss(image_emb, text_emb, logit_scale, image_cols, text_cols, offset)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs logit_bias")
        text_cols, offset = gather_features(text_emb)
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias, text_cols, offset)
    raise ValueError(f"unknown loss {kind!r}; expected 'clip' or 'siglip'")


def _check(rows_a: torch.Tensor, rows_b: torch.Tensor, cols_a: torch.Tensor, cols_b: torch.Tensor, offset: int) -> None:
    if rows_a.shape != rows_b.shape or rows_a.dim() != 2:
        raise ValueError(f"image and text rows must both be (B, D); got {tuple(rows_a.shape)}, {tuple(rows_b.shape)}")
    if cols_a.shape != cols_b.shape or cols_a.shape[1] != rows_a.shape[1]:
        raise ValueError(f"columns must be (G, D) with D={rows_a.shape[1]}; got {tuple(cols_a.shape)}")
    if not 0 <= offset <= cols_a.shape[0] - rows_a.shape[0]:
        raise ValueError(f"offset {offset} puts rows 0..{rows_a.shape[0] - 1} outside the {cols_a.shape[0]} columns")


# ---- preference losses ------------------------------------------------------------------------------------------
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards from summed reply log-probabilities (all (B,) tensors).

    With h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)):
    - `sigmoid` (DPO, Rafailov et al. 2023), with conservative label smoothing e (cDPO):
      -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h);
    - `ipo` (Azar et al. 2023): (h - 1 / (2 beta))^2;
    - `hinge` (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
    Returns (losses, chosen_rewards, rejected_rewards); a reward is beta (log pi - log ref), detached.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {PREFERENCE_LOSSES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()
