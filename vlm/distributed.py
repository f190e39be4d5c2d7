"""Sharded training with FSDP2 (`fully_shard`) under Lightning's `ModelParallelStrategy`, on GPUs and on the CPU.

Lightning's `FSDPStrategy` (FSDP1) refuses the CPU; FSDP2 applied in the stage's `configure_model` runs on gloo as
well as NCCL, so CI and the cluster share one code path (`conf/trainer/fsdp.yaml`):

- one FSDP unit per transformer block, the block classes found in the instantiated model (`find_blocks`), not a
  list of class names of one architecture; everything else (patch and token embeddings, norms, projector, LM head)
  is the root unit, so `VisionLanguageModel.embed` may call the decoder's embedding outside the decoder's forward;
- frozen parameters need nothing special: FSDP2 keeps them sharded and never reduces gradients for them, and a
  unit may mix frozen and trainable parameters (LoRA);
- bf16 compute with fp32 master weights and fp32 gradient reduction on GPUs (`param_dtype: auto`);
- activation checkpointing per block, applied before `fully_shard`;
- sharded checkpoints that hold only the trainable weights, written into a temporary directory that is renamed into
  place once every rank has finished (`FSDP2Strategy.save_checkpoint`), and a consolidated model directory at the end
  (`consolidated_state_dict` gathers full fp32 weights on rank 0).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("vlm")

# ---- which modules are blocks ----------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model: the members of every `nn.ModuleList` / `nn.Sequential` that holds two or
    more modules of one class with parameters and sub-modules (timm's `blocks`, HF `layers`, CLIP's `layers` ...).

    Only the outermost such lists count (experts inside a block stay in their block); leaf lists such as a
    projector's `Sequential(Linear, GELU, Linear)` or a list of `Linear`s are not blocks.
    """
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and _is_block_list(child):
                blocks.extend(child)
            else:
                visit(child)

    visit(model)
    return blocks


def block_classes(model: nn.Module) -> set[type]:
    """The classes `find_blocks` wraps, for reports and tests."""
    return {type(b) for b in find_blocks(model)}


def _is_block_list(container: nn.Module) -> bool:
    members = list(container.children())
    if len(members) < 2 or len({type(m) for m in members}) != 1:
        return False
    first = members[0]
    return any(True for _ in first.children()) and any(True for _ in first.parameters())


# ---- applying FSDP2 --------------------------------------------------------------------------------------------
def resolve_dtype(value: Any, device: torch.device) -> torch.dtype | None:
    """`auto`: bf16 on CUDA, none (fp32) elsewhere; otherwise a dtype name (`bfloat16`, `bf16`, `float32`) or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name in ("none", "null"):
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype


def apply_activation_checkpointing(blocks: Iterable[nn.Module], root: nn.Module) -> int:
    """Replace each block by a non-reentrant `checkpoint_wrapper` of itself (in its parent); returns the count.

    The wrapper strips its `_checkpoint_wrapped_module.` prefix from state-dict keys, so checkpoints and model
    directories are unaffected.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    targets = {id(b) for b in blocks}
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
                count += 1
    return count


def shard_model(
    model: nn.Module,
    mesh: Any,
    param_dtype: Any = "auto",
    reduce_dtype: Any = "float32",
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 in place: (checkpointing ->) `fully_shard` per block, then on `model` itself as the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = torch.device(mesh.device_type)
    pdtype = resolve_dtype(param_dtype, device)
    mp = MixedPrecisionPolicy(param_dtype=pdtype, reduce_dtype=resolve_dtype(reduce_dtype, device) if pdtype else None)
    blocks = find_blocks(model)
    if activation_checkpointing:
        apply_activation_checkpointing(blocks, model)
        blocks = find_blocks(model)  # the wrappers now sit in the lists
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # the root stays gathered from forward to backward: it is needed again at once, and stages may use its
    # parameters outside the model's forward (CLIP's logit scale in the loss, the decoder's token embeddings)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    classes = sorted({type(_unwrap(b)).__name__ for b in blocks})
    log.info("FSDP2: %d blocks (%s) + root; param dtype %s, reduce dtype %s, activation checkpointing %s",
             len(blocks), ", ".join(classes), pdtype, mp.reduce_dtype, activation_checkpointing)
    return model


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and persistent buffers live on the meta device: no memory, same structure
    and names, tied weights still tied. Taken before sharding, it receives the consolidated weights at export.
    Non-persistent buffers (rotary frequencies, position ids) are small and copied for real."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) not in memo:
            memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set and id(buf) not in memo:
                memo[id(buf)] = torch.empty_like(buf, device="meta")
    return copy.deepcopy(model, memo)


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a sharded model, on the CPU of rank 0 (an empty dict elsewhere). A collective: every
    rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def materialize(skeleton: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a full state dict into a meta skeleton (strict, by assignment), keeping its tied weights tied."""
    tied: dict[int, list[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    # gathered tensors can be views of one flat buffer per FSDP unit: give each its own storage (safetensors needs it)
    state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    for names in tied.values():
        first = skeleton.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(skeleton.get_submodule(owner) if owner else skeleton, attr, first)
    return skeleton


# ---- the strategy ----------------------------------------------------------------------------------------------
def _strategy_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_strategy_base()):
    """`ModelParallelStrategy` with every rank in data parallel (`data_parallel_size: auto` = world size,
    `tensor_parallel_size: 1`), the FSDP2 options the stage applies in `configure_model`, and sharded checkpoints
    that are atomic and hold the trainable weights only.

    param_dtype: compute dtype of the gathered weights (`auto`: bf16 on CUDA, fp32 on CPU); master weights and the
    optimizer stay fp32. reduce_dtype: gradient reduction dtype (fp32). activation_checkpointing: recompute each
    block's activations in backward.
    """

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int = 1,
        param_dtype: Any = "auto",
        reduce_dtype: Any = "float32",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.fsdp_options = {
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "activation_checkpointing": bool(activation_checkpointing),
            "reshard_after_forward": bool(reshard_after_forward),
        }

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size // int(self._tensor_parallel_size)

    # -- checkpoints --
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        from vlm.checkpointing import atomic_torch_save, fsync_dir, partial_path

        path = Path(self.broadcast(str(filepath)))
        tmp = partial_path(path)
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(state, tmp)
        if self.global_rank == 0:
            atomic_torch_save(checkpoint, tmp / _METADATA_FILENAME)
        self.barrier()
        if self.global_rank == 0:
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
            fsync_dir(path.parent)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Sharded checkpoints hold the trainable weights only: load those (every trainable key must be there),
        keep the frozen ones the model already has, then the optimizer; metadata with `weights_only=True`."""
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint

        path = Path(self.broadcast(str(checkpoint_path)))
        if not _is_sharded_checkpoint(path):  # one file with the full trainable weights (save_distributed: false)
            from vlm.checkpointing import check_trainable_keys

            header = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
            check_trainable_keys(self.lightning_module, header["state_dict"].keys(), path, header.get("vlm"))
            del header
            module, strict = self.lightning_module, self.lightning_module.strict_loading
            module.strict_loading = False  # frozen weights are not in the file: keep the model's
            try:
                return super().load_checkpoint(path, weights_only=True)
            finally:
                module.strict_loading = strict
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from vlm.checkpointing import check_trainable_keys

        module = self.model
        stored = {k.split(".", 1)[1] for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata
                  if k.startswith("state_dict.")}
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=True)
        check_trainable_keys(self.lightning_module, stored, path, metadata.get("vlm"))
        model_state = {k: v for k, v in get_model_state_dict(module).items() if k in stored}
        loaded = {"state_dict": model_state}
        dcp_load(loaded, checkpoint_id=str(path))
        set_model_state_dict(module, loaded["state_dict"], options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp_load(optim_state, checkpoint_id=str(path))
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return metadata


def fsdp_options(strategy: Any) -> dict[str, Any]:
    """The FSDP2 options of a strategy (defaults for a plain `ModelParallelStrategy`)."""
    return dict(getattr(strategy, "fsdp_options", {"param_dtype": "auto", "reduce_dtype": "float32",
                                                     "activation_checkpointing": False,
                                                     "reshard_after_forward": True}))


def uses_fsdp2(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


# ---- the cluster -----------------------------------------------------------------------------------------------
def cluster_plugins() -> list[Any]:
    """Under a SLURM batch job, `SLURMEnvironment(auto_requeue=False)`: ranks come from SLURM, and requeueing has
    exactly one owner, `vlm.callbacks.PreemptionCheckpoint` (which hands over to submitit when submitit launched the
    job). Lightning's own requeue handler would save from inside the signal handler and requeue a second time."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    interactive = os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive")
    if SLURMEnvironment.detect() and not interactive:
        return [SLURMEnvironment(auto_requeue=False)]
    return []
