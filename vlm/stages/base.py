"""What every stage shares: which parts train, the optimizer and schedule, and the parameter report.

A stage names the parts it trains (`trainable: [projector, decoder]`); everything else is frozen, so the same
model object serves every stage and the choice lives in config, not in code.

Also shared, so that every stage scales out and survives interruption the same way:
- `configure_model` applies FSDP2 when the trainer runs `trainer=fsdp` (`vlm.distributed`), and
  `gather_for_export` turns the sharded model back into a plain one on rank 0 for `export`;
- checkpoints hold the trainable weights only and record the base they need (`on_save_checkpoint`), and loading
  checks that every trainable weight is there (`on_load_checkpoint`; `vlm.checkpointing`);
- a non-finite loss or gradient norm stops the run naming the step and the batch keys, or skips the step
  (`nonfinite_loss`; a skipped step does not count toward `max_steps`, and `max_consecutive_skips` in a row stop the
  run); weights that turn non-finite stop the run in both modes, and `check_finite` keeps a model directory from
  ever being written from them;
- the effective global batch size is printed at the start.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from vlm.stages.resolution import match_batch_resolution


def set_trainable(model: nn.Module, trainable: Iterable[str]) -> None:
    """Freeze every parameter, then unfreeze the named child modules (dotted paths allowed)."""
    trainable = list(trainable)
    known = {name for name, _ in model.named_children()}
    for name in trainable:
        if name.split(".")[0] not in known:
            raise ValueError(f"trainable part {name!r} is not a part of this model; parts are {sorted(known)}")
    model.requires_grad_(False)
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(trainable, frozen) parameter counts per top-level part."""
    counts = {}
    for name, part in model.named_children():
        params = list(part.parameters())
        trained = sum(p.numel() for p in params if p.requires_grad)
        counts[name] = (trained, sum(p.numel() for p in params) - trained)
    return counts


def format_parameter_counts(counts: Mapping[str, tuple[int, int]]) -> str:
    lines = [f"{'part':<12}{'trainable':>14}{'frozen':>14}"]
    for name, (trained, frozen) in counts.items():
        lines.append(f"{name:<12}{trained:>14,}{frozen:>14,}")
    total_t = sum(t for t, _ in counts.values())
    total_f = sum(f for _, f in counts.values())
    lines.append(f"{'total':<12}{total_t:>14,}{total_f:>14,}")
    return "\n".join(lines)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, embeddings-scale scalars and learned temperatures are not decayed."""
    return param.ndim < 2 or "norm" in name.lower() or "logit_scale" in name or "logit_bias" in name


class NonFiniteLossError(FloatingPointError):
    """A training loss or gradient norm was NaN or infinite, or weights became so (the message names the step)."""


NONFINITE_POLICIES = ("stop", "skip")


def check_finite(model: nn.Module, what: str = "model") -> None:
    """Raise `NonFiniteLossError` if any parameter or buffer holds NaN/inf (before writing a model directory)."""
    bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteLossError(f"{what}: {len(bad)} tensors hold NaN/inf (first: {bad[0]}); the run diverged, no "
                                 "model directory is written from it")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2) global value; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Stage(L.LightningModule):
    """Base LightningModule: freezing by config, AdamW with warmup + schedule, parameter report.

    Attributes the runner may set after construction (so subclasses keep the constructor signature):
    `base_weights` - what the weights were built from (`init_from`, model config, seed), recorded in checkpoints;
    `nonfinite_loss` - `stop` (default) or `skip` the optimizer step when a loss is NaN/inf.
    """

    def __init__(
        self,
        model: nn.Module,
        trainable: Iterable[str],
        optim: Mapping[str, Any] | None = None,
        name: str = "stage",
    ) -> None:
        super().__init__()
        self.model = model
        self.stage_name = name
        self.trainable = list(trainable)
        self.optim = dict(optim or {})
        self.base_weights: dict[str, Any] = {}
        self.nonfinite_loss = "stop"
        self.max_consecutive_skips: int | None = 10
        self._consecutive_skips = 0
        self._skipped_last = False
        self._grad_norm: torch.Tensor | None = None      # this step's, reused by gradient clipping
        self._weights_ok: tuple[int, torch.Tensor] | None = None  # (step, flag) checked with the next step's flags
        self._skeleton: list[nn.Module] = []  # a list, so the meta copy is not registered as a sub-module
        self._batch_keys: list[str] = []
        self._nonfinite: list[tuple[torch.Tensor, list[str]]] = []
        self.skipped_steps = 0
        set_trainable(self.model, self.trainable)

    def on_fit_start(self) -> None:
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}, got {self.nonfinite_loss!r}")
        counts = format_parameter_counts(parameter_counts(self.model))
        rank_zero_info(f"[{self.stage_name}] trains {self.trainable}\n{counts}")
        rank_zero_info(f"[{self.stage_name}] {effective_batch_report(self.trainer)}")
        size = getattr(getattr(self.model, "encoder", None), "image_size", None)
        if size is not None:
            schedule = getattr(getattr(self.trainer, "datamodule", None), "resolution_schedule", None)
            rank_zero_info(f"[{self.stage_name}] image size: {size} px (the encoder's input)"
                           + (f"; by optimizer step: {dict(schedule)}" if schedule else ""))

    # ---- scale-out ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under `ModelParallelStrategy` (`trainer=fsdp`): FSDP2 per block plus root, as the strategy configures."""
        from vlm.distributed import fsdp_options, is_sharded, meta_skeleton, shard_model, uses_fsdp2

        if self._trainer is None or not uses_fsdp2(self.trainer.strategy) or is_sharded(self.model):
            return
        self._skeleton = [meta_skeleton(self.model)]
        shard_model(self.model, self.device_mesh["data_parallel"], **fsdp_options(self.trainer.strategy))

    def gather_for_export(self) -> None:
        """Collective under FSDP2 (call on every rank): full fp32 weights are gathered to rank 0, whose `model`
        becomes a plain module that `export` can write; other ranks keep their shards. A no-op otherwise."""
        from vlm.distributed import consolidated_state_dict, is_sharded, materialize

        if not is_sharded(self.model):
            return
        full = consolidated_state_dict(self.model)
        if self.trainer.is_global_zero:
            if not self._skeleton:
                raise RuntimeError("no meta skeleton was taken before sharding; cannot consolidate")
            self.model = materialize(self._skeleton.pop(), full)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights; record the stage, its parts and keys, and the base weights it needs."""
        from vlm.checkpointing import trainable_keys

        keep = set(trainable_keys(self)) | self._trainable_buffer_keys()
        state = checkpoint.get("state_dict")
        if state is not None:
            for key in [k for k in state if k not in keep]:
                del state[key]
        checkpoint["vlm"] = {
            "stage": self.stage_name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "trainable": list(self.trainable),
            "keys": sorted(keep),
            "base": dict(self.base_weights),
        }

    def _trainable_buffer_keys(self) -> set[str]:
        """Persistent buffers inside the trainable parts (e.g. normalisation statistics): they change in training."""
        from vlm.checkpointing import clean_key

        keys = set()
        for part in self.trainable:
            module = self.model.get_submodule(part)
            for owner_name, owner in module.named_modules():
                for name, buf in owner._buffers.items():
                    if buf is not None and name not in owner._non_persistent_buffers_set:
                        keys.add(clean_key(".".join(p for p in ("model", part, owner_name, name) if p)))
        return keys

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint has every trainable weight and fill in the frozen ones from this model, so the
        strict load that follows succeeds. (Sharded checkpoints are checked by `FSDP2Strategy.load_checkpoint`.)"""
        from vlm.checkpointing import check_trainable_keys, describe_base

        info = checkpoint.get("vlm")
        if info is None:
            return
        base = info.get("base") or {}
        if self.base_weights and base and base.get("init_from") != self.base_weights.get("init_from"):
            rank_zero_warn(f"[{self.stage_name}] the checkpoint was trained on {describe_base(info)}; this run's "
                           f"base is init_from={self.base_weights.get('init_from')!r}")
        state = checkpoint.get("state_dict")
        if state is None:
            return
        check_trainable_keys(self, state.keys(), "being loaded", info)
        for key, value in self.state_dict().items():
            state.setdefault(key, value)

    # ---- guards ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        keys = batch.get("keys") if isinstance(batch, Mapping) else None
        self._batch_keys = [str(k) for k in keys] if keys is not None else []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Every batch (training and evaluation), before any callback sees it: the encoder switched to the image
        size the batch was built at (`vlm.stages.resolution`), the optimizers following a replaced table."""
        if isinstance(batch, Mapping):
            optimizers = self.trainer.optimizers if self._trainer is not None else []
            match_batch_resolution(self.model, batch, optimizers)
        return batch

    def on_before_backward(self, loss: torch.Tensor) -> None:
        # no host sync here: the flags are read once per optimizer step
        self._nonfinite.append((loss.detach(), list(self._batch_keys)))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Run forward/backward first, then agree across ranks (one reduce, one host sync per step) whether any loss
        of this step, the gradient norm, or the weights after the previous update were NaN/inf; then stop, skip (no
        optimizer update, and the step does not count) or step. The gradient norm is the one clipping uses."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        cache: dict[str, Any] = {}

        def closure():
            if "loss" not in cache:
                cache["loss"] = optimizer_closure()
            return cache["loss"]

        closure()
        seen, self._nonfinite = self._nonfinite, []
        device = self.device
        flags = torch.zeros(3, device=device)  # loss, gradient norm, weights after the previous update
        if seen:
            flags[0] = torch.stack([~torch.isfinite(v.float()).all() for v, _ in seen]).any().float()
        # under fp16 loss scaling the gradients are still scaled here and may overflow by design (the scaler skips
        # those steps itself): no gradient check then, and Lightning's own clipping after unscaling
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        self._grad_norm = None if scaled else self._total_grad_norm(optimizer)
        if self._grad_norm is not None:
            flags[1] = (~torch.isfinite(_full(self._grad_norm))).float().to(device)
        weights_step = None
        if self._weights_ok is not None:
            weights_step, ok = self._weights_ok
            flags[2] = 1.0 - ok.float().to(device)
            self._weights_ok = None
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        loss_bad, grad_bad, weights_bad = (bool(f) for f in flags.tolist())
        if weights_bad:
            raise NonFiniteLossError(f"[{self.stage_name}] the weights became NaN/inf in the update of step "
                                     f"{weights_step}: the run diverged (lower optim.lr, or check the data)")
        if loss_bad or grad_bad:
            bad = [(float(v.float()), keys) for v, keys in seen if not math.isfinite(float(v.float()))]
            self._handle_nonfinite(bad, batch_idx, optimizer, grad_bad and not loss_bad)
            return
        self._consecutive_skips, self._skipped_last = 0, False
        optimizer.step(closure=closure)
        self._weights_ok = (self.global_step, self._weights_finite(optimizer))

    @staticmethod
    def _params(optimizer: Any) -> list[torch.Tensor]:
        groups = getattr(optimizer, "optimizer", optimizer).param_groups
        return [p for g in groups for p in g["params"]]

    def _total_grad_norm(self, optimizer: Any) -> torch.Tensor | None:
        grads = [p.grad for p in self._params(optimizer) if p.grad is not None]
        if not grads:
            return None
        return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)

    def _weights_finite(self, optimizer: Any) -> torch.Tensor:
        """A 0-d bool tensor (no host sync): whether every trained weight is finite after this update."""
        params = [p.detach() for p in self._params(optimizer)]
        if not params:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(_full(torch.nn.utils.get_total_norm(params, 2.0, error_if_nonfinite=False)))

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by norm with the norm `optimizer_step` already computed for its check (no second pass)."""
        norm = self._grad_norm
        if gradient_clip_val and (gradient_clip_algorithm in (None, "norm")) and norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self._params(optimizer), float(gradient_clip_val), norm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if self._skipped_last:  # a skipped update does not advance the schedule either
            return
        super().lr_scheduler_step(scheduler, metric)

    def on_train_end(self) -> None:
        if self._weights_ok is not None:  # the last update's weights, checked once here
            step, ok = self._weights_ok
            self._weights_ok = None
            if not bool(ok):
                raise NonFiniteLossError(f"[{self.stage_name}] the weights became NaN/inf in the update of step "
                                         f"{step}: the run diverged (lower optim.lr, or check the data)")

    def _uncount_step(self) -> None:
        """Lightning counts an optimizer step once this hook returns, whether or not it stepped: take it back, so
        a skipped update does not count toward `max_steps`."""
        progress = self.trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
        for tracker in (progress.total, progress.current):
            tracker.ready -= 1
            tracker.completed -= 1

    def _handle_nonfinite(self, bad: list[tuple[float, list[str]]], batch_idx: int, optimizer: Any,
                          grad_only: bool = False) -> None:
        from vlm.callbacks import gather_objects

        reports = [r for rank_reports in gather_objects(bad) for r in rank_reports]
        keys = [k for _, ks in reports for k in ks]
        values = sorted({str(v) for v, _ in reports})
        what = "gradient norm" if grad_only else f"loss {values}"
        where = f"step {self.global_step} (batch {batch_idx})"
        shown = ", ".join(keys[:20]) + (f" ... ({len(keys)} keys)" if len(keys) > 20 else "")
        if self.nonfinite_loss == "skip":
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._consecutive_skips += 1
            self._skipped_last = True
            self._uncount_step()
            limit = self.max_consecutive_skips
            if limit and self._consecutive_skips >= limit:
                raise NonFiniteLossError(
                    f"[{self.stage_name}] non-finite {what} at {where}: {self._consecutive_skips} updates in a row "
                    f"skipped (guards.max_consecutive_skips={limit}); the run diverged (lower optim.lr, or check "
                    "the data)")
            rank_zero_warn(f"[{self.stage_name}] non-finite {what} at {where}: step skipped "
                           f"({self.skipped_steps} so far, {self._consecutive_skips} in a row); batch keys: "
                           f"{shown or '(none)'}")
            return
        raise NonFiniteLossError(f"[{self.stage_name}] non-finite {what} at {where}; batch keys: "
                                 f"{shown or '(the batch carries no keys)'}. Set guards.nonfinite_loss=skip to skip "
                                 "such steps instead.")

    def configure_optimizers(self):
        from transformers import get_scheduler

        opt = self.optim
        decay, plain = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (plain if no_decay(name, param) else decay).append(param)
        if not decay and not plain:
            raise ValueError(f"stage {self.stage_name!r} has nothing to train: trainable={self.trainable}")
        groups = [
            {"params": decay, "weight_decay": opt.get("weight_decay", 0.0)},
            {"params": plain, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=opt.get("lr", 1e-3),
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            eps=opt.get("eps", 1e-8),
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = opt.get("warmup_steps")
        if warmup is None:
            warmup = int(opt.get("warmup_ratio", 0.03) * total)
        scheduler = get_scheduler(
            opt.get("scheduler", "cosine"), optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def effective_batch_report(trainer: Any) -> str:
    """`effective global batch size: B per device x A accumulation x R data-parallel ranks = G`."""
    per_device = None
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        per_device = getattr(datamodule, "batch_size", None)
    accumulation = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    try:
        ranks = int(trainer.strategy.distributed_sampler_kwargs["num_replicas"])
    except Exception:  # noqa: BLE001 - single device strategies have no sampler kwargs
        ranks = int(getattr(trainer, "world_size", 1) or 1)
    if per_device is None:
        return f"effective global batch size: (per-device batch unknown) x {accumulation} accumulation x {ranks} ranks"
    total = int(per_device) * accumulation * ranks
    return (f"effective global batch size: {per_device} per device x {accumulation} accumulation x {ranks} "
            f"data-parallel ranks = {total}")
