"""The `dpo` stage: preference alignment after sft (DPO, IPO or SLiC's hinge, plus an optional SFT term).

A batch holds B pairs (`vlm.data.preference`): rows 0..B-1 the chosen replies, rows B..2B-1 the rejected ones,
and each pair's images once. The images are encoded once and spliced into both rows of their pair; one decoder
pass over the 2B rows gives the summed log-probability of every reply (the LM head runs at reply tokens only).

The reference model, `reference=`:
- `copy`: a frozen copy of the starting model (a second model in memory);
- `adapter`: with LoRA, the same model with its adapters disabled (only the adapters may train, so what is left
  is exactly the starting model);
- `precomputed`: before training, one pass over the training and validation pairs with the starting model stores
  each pair's reference log-probabilities beside the data (`reference-logps/<fingerprint>.json` next to the first
  training shard, or `reference_cache=`), keyed by sample; training then holds no reference model at all.
When the encoder and projector are frozen, the reference reuses the policy's image features (no second encoding).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.losses import PREFERENCE_LOSSES, dpo_loss
from vlm.stages.generative import GenerativeStage

log = logging.getLogger(__name__)

REFERENCE_MODES = ("copy", "adapter", "precomputed")
VISION_PARTS = ("encoder", "projector")


class DPOStage(GenerativeStage):
    """Direct preference optimisation over `preference` data; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        trainable: Iterable[str],
        optim: Mapping[str, Any] | None = None,
        name: str = "dpo",
        data_format: str = "preference",
        lora: Mapping[str, Any] | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference: str = "copy",
        reference_cache: str | None = None,
    ) -> None:
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type must be one of {PREFERENCE_LOSSES}, got {loss_type!r}")
        if data_format != "preference":
            raise ValueError(f"the dpo stage reads preference pairs: data_format must be 'preference', "
                             f"got {data_format!r}")
        trainable = list(trainable)
        if reference == "adapter":
            if not lora:
                raise ValueError("reference=adapter is the model with its LoRA adapters disabled: set stage.lora, "
                                 "or use reference=copy|precomputed")
            if trainable != ["decoder"]:
                raise ValueError("reference=adapter needs the adapters to be all that trains (stage.trainable="
                                 f"[decoder]); {trainable} would change the reference too")
        frozen_start = copy.deepcopy(model) if reference == "copy" else None  # before LoRA wraps the decoder
        super().__init__(model, trainable, optim, name, data_format, lora)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.sft_weight = float(sft_weight)
        self.reference = reference
        self.reference_cache = reference_cache
        self.shares_features = not any(part.split(".")[0] in VISION_PARTS for part in self.trainable)
        self.reference_model: nn.Module | None = None
        if frozen_start is not None:
            self.reference_model = frozen_start.requires_grad_(False).eval()
        self.reference_logps: dict[str, tuple[float, float]] | None = None

    # ---- log-probabilities ----------------------------------------------------------------------------------
    @staticmethod
    def pair_logps(model: nn.Module, batch: Mapping[str, Any], features: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed reply log-probabilities (2B,), reply token counts (2B,)); the B pairs' image `features` are
        spliced into both the chosen and the rejected rows."""
        if features is not None:
            features = torch.cat([features, features])
        return model.reply_logps(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                 image_features=features)

    def reference_pair_logps(self, batch: Mapping[str, Any], features: torch.Tensor | None) -> torch.Tensor:
        """Reference log-probabilities (2B,) of the batch's replies, chosen then rejected, without gradients."""
        pairs = batch["input_ids"].shape[0] // 2
        if self.reference == "precomputed":
            if self.reference_logps is None:
                raise RuntimeError("reference=precomputed: the reference log-probabilities were not computed yet "
                                   "(they are, at the start of fit)")
            missing = [k for k in batch["keys"] if k not in self.reference_logps]
            if missing:
                raise KeyError(f"no precomputed reference log-probabilities for sample {missing[0]!r} "
                               f"({len(missing)} of {pairs} in this batch): the cache does not match the data")
            values = torch.tensor([self.reference_logps[k] for k in batch["keys"]], dtype=torch.float32,
                                  device=batch["input_ids"].device)
            return torch.cat([values[:, 0], values[:, 1]])
        with torch.no_grad():
            if self.reference == "adapter":
                with self.model.decoder.disable_adapter():
                    return self.pair_logps(self.model, batch, None if features is None else features.detach())[0]
            reference = self.reference_model
            reference.eval()
            if features is not None and not self.shares_features:
                features = reference.encode_images(batch["pixel_values"])
            return self.pair_logps(reference, batch, None if features is None else features.detach())[0]

    # ---- loss -----------------------------------------------------------------------------------------------
    def preference_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of a batch of pairs: the mean preference loss, plus `sft_weight` times the chosen
        replies' mean token NLL (RPO / MPO: keeps the chosen likelihood from falling with the rejected one)."""
        pairs = batch["input_ids"].shape[0] // 2
        pixels = batch.get("pixel_values")
        features = self.model.encode_images(pixels) if pixels is not None else None
        logps, counts = self.pair_logps(self.model, batch, features)
        ref = self.reference_pair_logps(batch, features).to(logps.dtype)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], self.beta, self.loss_type, self.label_smoothing)
        loss = losses.mean()
        nll = -logps[:pairs].sum() / counts[:pairs].sum().clamp(min=1)
        if self.sft_weight:
            loss = loss + self.sft_weight * nll
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps[:pairs].detach().mean(),
            "logps/rejected": logps[pairs:].detach().mean(),
            "nll/chosen": nll.detach(),
        }
        return loss, metrics

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.preference_loss(batch)[0]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.preference_loss(batch)
        pairs = batch["input_ids"].shape[0] // 2
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        self.log_dict(metrics, batch_size=pairs)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss, metrics = self.preference_loss(batch)
        pairs = batch["input_ids"].shape[0] // 2
        self.log("val/loss", loss, prog_bar=True, batch_size=pairs, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=pairs, sync_dist=True)

    def configure_model(self) -> None:
        from vlm.distributed import uses_fsdp2

        if self._trainer is not None and uses_fsdp2(self.trainer.strategy):
            # the pair's images are encoded outside the sharded root's forward, and a `copy` reference would not
            # be sharded: neither is handled yet
            raise NotImplementedError("the dpo stage does not run under trainer=fsdp yet: use trainer=ddp "
                                      "(with LoRA and reference=adapter|precomputed for large models)")
        super().configure_model()

    # ---- the precomputed reference --------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference == "precomputed" and self.reference_logps is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "sources"):
                raise ValueError("reference=precomputed reads the pairs through the run's DataModule "
                                 "(trainer.fit(stage, datamodule=...))")
            self.reference_logps = self.precompute_reference(datamodule)

    def precompute_reference(self, datamodule: Any) -> dict[str, tuple[float, float]]:
        """{sample key: (chosen, rejected) reference log-probabilities} for every training and validation pair,
        read from the cache when it matches, else computed with the current (starting) model and written there."""
        path = reference_cache_path(datamodule, self.base_weights, self.reference_cache)
        if path.is_file():
            data = json.loads(path.read_text())
            log.info("[%s] reference log-probabilities of %d pairs read from %s", self.stage_name,
                     len(data["logps"]), path)
            return {k: (float(v[0]), float(v[1])) for k, v in data["logps"].items()}
        if self._trainer is not None and self._trainer.ckpt_path:
            raise FileNotFoundError(f"resuming with reference=precomputed but the cache {path} is gone: the model "
                                    "is no longer the starting model, so it cannot be recomputed")
        from vlm.callbacks import gather_objects

        rank, world = datamodule.dist() if hasattr(datamodule, "dist") else (0, 1)
        values: dict[str, tuple[float, float]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in one_pass_batches(datamodule, rank, world):
                    batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    pixels = batch.get("pixel_values")
                    features = self.model.encode_images(pixels) if pixels is not None else None
                    logps = self.pair_logps(self.model, batch, features)[0].float().cpu()
                    pairs = len(batch["keys"])
                    for i, key in enumerate(batch["keys"]):
                        _add_unique(values, key, (float(logps[i]), float(logps[pairs + i])))
        finally:
            self.model.train(was_training)
        merged: dict[str, tuple[float, float]] = {}
        for part in gather_objects(values):
            for key, value in part.items():
                _add_unique(merged, key, value)
        if rank == 0:
            write_json_atomic(path, {"base": _jsonable(self.base_weights), "logps": merged})
            log.info("[%s] reference log-probabilities of %d pairs written to %s", self.stage_name, len(merged), path)
        if world > 1:
            self.trainer.strategy.barrier("reference-logps")
        return merged


# ---- helpers ----------------------------------------------------------------------------------------------------
def one_pass_batches(datamodule: Any, rank: int = 0, world: int = 1):
    """Every training and validation pair once, in shard order, in the main process (this rank's shards)."""
    from vlm.data.skips import SkipCounter
    from vlm.data.stream import StreamDataset, StreamState

    sources = [dataclasses.replace(s, val_urls=list(s.urls)) for s in datamodule.sources]
    sources += [dataclasses.replace(s, name=f"{s.name}-val") for s in datamodule.val_sources]
    dataset = StreamDataset(sources, datamodule.sample_fns(sources), datamodule.processors, datamodule.collator,
                            SkipCounter(), StreamState(1), datamodule.batch_size, 1, train=False,
                            seed=datamodule.seed, rank=rank, world_size=world)
    return iter(dataset)


def reference_cache_path(datamodule: Any, base: Mapping[str, Any], where: str | None = None) -> Path:
    """`<first training shard's folder>/reference-logps/<fingerprint>.json` (or under `where`). The fingerprint
    covers what the log-probabilities depend on: the starting weights (init_from, its weights file's size and
    time, model config, seed), the shards, and how samples become tokens."""
    processor = datamodule.processor
    init_from = base.get("init_from")
    weights = None
    if init_from:
        file = Path(init_from) / "model.safetensors"
        if file.is_file():
            stat = file.stat()
            weights = [stat.st_size, stat.st_mtime_ns]
    urls = [u for s in datamodule.sources for u in s.urls] + [u for s in datamodule.val_sources
                                                               for u in (s.val_urls or [])]
    fingerprint = {
        "base": _jsonable(base), "weights": weights, "urls": urls,
        "max_length": getattr(processor, "max_length", None),
        "tokens_per_image": getattr(processor, "tokens_per_image", None),
        "image_size": getattr(processor, "image_size", None),
        "template": getattr(getattr(processor, "tokenizer", None), "chat_template", None),
    }
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if where:
        folder = Path(where)
    else:
        first = urls[0]
        if "://" in first or first.startswith("pipe:"):
            raise ValueError("reference=precomputed with remote shards: set stage.reference_cache to a local folder")
        folder = Path(first).resolve().parent / "reference-logps"
    return folder / f"{digest}.json"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _add_unique(values: dict[str, tuple[float, float]], key: str, value: tuple[float, float]) -> None:
    if key in values and values[key] != value:
        raise ValueError(f"sample key {key!r} occurs twice in the preference data with different pairs: "
                         "precomputed reference log-probabilities are keyed by sample, so keys must be unique")
    values[key] = value


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
