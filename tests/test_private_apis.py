"""Every private third-party name the code relies on (docs/architecture.md, "Private APIs we rely on") still exists.

An upgrade that removes or renames one fails here, naming the symbol and where we use it, instead of somewhere deep
in a training run. pyproject.toml bounds each package below its next major version; this test guards the minors.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
from torch import nn


def _resolve(path: str) -> Any:
    """`package.module:attr.attr` -> the object (ImportError / AttributeError name the missing part)."""
    module_name, _, attrs = path.partition(":")
    obj = importlib.import_module(module_name)
    for attr in filter(None, attrs.split(".")):
        obj = getattr(obj, attr)
    return obj


# symbol -> where we use it (the failure message says both)
IMPORTED = {
    "torch:UntypedStorage._new_shared": "vlm.data.handover (shared buffers without a zero-filled copy)",
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper:checkpoint_wrapper":
        "vlm.distributed.apply_activation_checkpointing",
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper:CheckpointImpl":
        "vlm.distributed.apply_activation_checkpointing",
    "torch.distributed._functional_collectives": "vlm.losses (autograd-aware all-gather of embeddings)",
    "lightning.fabric.strategies.model_parallel:_distributed_checkpoint_save": "vlm.distributed.FSDP2Strategy",
    "lightning.fabric.strategies.model_parallel:_is_sharded_checkpoint": "vlm.distributed.FSDP2Strategy",
    "lightning.fabric.utilities.load:_METADATA_FILENAME": "vlm.distributed.FSDP2Strategy",
    "lightning.pytorch.strategies:ModelParallelStrategy._setup_distributed": "vlm.distributed.FSDP2Strategy",
    "transformers.utils.chat_template_utils:_compile_jinja_template": "vlm.data.processor.ChatRenderer",
    "transformers:LlavaForConditionalGeneration._from_config": "vlm.interop.llava (export)",
    "webdataset.filters:_shuffle": "vlm.data.tar.raw_samples (seeded shuffle buffer)",
    "timm.models.vision_transformer:VisionTransformer._pos_embed": "vlm.models.encoders.timm_vit (FLIP masking)",
    "jinja2.runtime:new_context": "vlm.data.processor.ChatRenderer (render without building a context twice)",
}


@pytest.mark.parametrize("symbol", sorted(IMPORTED))
def test_imported_private_name_exists(symbol: str) -> None:
    try:
        _resolve(symbol)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"private API {symbol} is gone ({type(exc).__name__}: {exc}); used by {IMPORTED[symbol]}: "
                    "update the code and docs/architecture.md, or pin the package below this version")


def _missing(obj: Any, names: list[str]) -> list[str]:
    return [name for name in names if not hasattr(obj, name)]


def test_functional_collectives_all_gather() -> None:
    from torch.distributed import _functional_collectives as fc

    assert hasattr(fc, "all_gather_single_autograd") or hasattr(fc, "all_gather_tensor_autograd"), (
        "torch.distributed._functional_collectives has neither all_gather_single_autograd nor "
        "all_gather_tensor_autograd (vlm.losses gathers embeddings with them)")


def test_module_buffer_internals() -> None:
    """`nn.Module._buffers` / `_non_persistent_buffers_set` (vlm.distributed.meta_skeleton, Stage checks, llava)."""
    module = nn.BatchNorm1d(2)
    missing = _missing(module, ["_buffers", "_non_persistent_buffers_set"])
    assert not missing, f"torch.nn.Module lacks {missing} (vlm.distributed.meta_skeleton, vlm.stages.base)"


def test_wrapper_segments_in_parameter_names() -> None:
    """`vlm.checkpointing.WRAPPER_PREFIXES`: the name segments wrappers insert, which `clean_key` removes."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    from vlm.checkpointing import WRAPPER_PREFIXES, clean_key

    wrapped = nn.Sequential(checkpoint_wrapper(nn.Linear(2, 2)))  # (the wrapper strips its own segment itself)
    assert hasattr(wrapped[0], "_checkpoint_wrapped_module"), "checkpoint_wrapper has no _checkpoint_wrapped_module"
    names = [n for n, _ in wrapped.named_parameters()]
    assert all(any(p in n for p in WRAPPER_PREFIXES) for n in names), f"wrapper segments changed: {names}"
    assert {clean_key(n) for n in names} == {"0.weight", "0.bias"}
    # torch.compile's wrapper keeps the module as `_orig_mod` (read from its source: importing dynamo takes ~15 s)
    source = Path(importlib.util.find_spec("torch._dynamo.eval_frame").origin).read_text()
    assert '"_orig_mod"' in source or "'_orig_mod'" in source or "self._orig_mod" in source, (
        "torch.compile's OptimizedModule no longer holds `_orig_mod`")
    assert clean_key("_orig_mod.0.weight") == "0.weight"
    assert f"{FSDP_WRAPPED_MODULE}." in WRAPPER_PREFIXES, f"FSDP1 wraps modules as {FSDP_WRAPPED_MODULE!r} now"


def test_lightning_loop_and_strategy_internals(tmp_path) -> None:
    """Trainer internals read by vlm.callbacks.ResumeState / PreemptionCheckpoint and vlm.stages.generative, and the
    ModelParallelStrategy attributes FSDP2Strategy sets."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    loop = trainer.fit_loop.epoch_loop
    assert not _missing(loop, ["_batches_that_stepped"]), "epoch loop lacks _batches_that_stepped (ResumeState)"
    assert not _missing(loop, ["_skip_next_val"]), "epoch loop lacks _skip_next_val (PreemptionCheckpoint)"
    connector = getattr(trainer, "_logger_connector", None)
    assert connector is not None, "Trainer lacks _logger_connector (ResumeState, GenerativeStage)"
    missing = _missing(type(connector), ["should_update_logs", "metrics"])  # properties (read during fit only)
    assert not missing, f"_logger_connector lacks {missing} (ResumeState, GenerativeStage)"
    strategy = ModelParallelStrategy()
    missing = _missing(strategy, ["_data_parallel_size", "_tensor_parallel_size", "_save_distributed_checkpoint"])
    assert not missing, f"ModelParallelStrategy lacks {missing} (vlm.distributed.FSDP2Strategy)"


def test_logger_experiment_attribute(tmp_path) -> None:
    """The runner finishes a logger's run through `logger._experiment` (never starting one just to finish it)."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    for logger in (CSVLogger(tmp_path), WandbLogger(save_dir=str(tmp_path), offline=True)):
        assert hasattr(logger, "_experiment"), f"{type(logger).__name__} has no _experiment (vlm.run)"


def test_transformers_config_internals() -> None:
    """`config._attn_implementation` and `config._name_or_path` (vlm.models.attention, decoders, interop.llava)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    missing = _missing(config, ["_attn_implementation", "_name_or_path"])
    assert not missing, f"transformers PretrainedConfig lacks {missing}"


def test_jinja_template_internals() -> None:
    """The ChatRenderer fast path renders a compiled template's `root_render_func` in a context of its own."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    compiled = _compile_jinja_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    missing = _missing(compiled, ["globals", "environment", "name", "blocks", "root_render_func"])
    assert not missing, f"the compiled chat template lacks {missing} (vlm.data.processor.ChatRenderer)"
