"""The part types a saved file may name, and the only classes loading one ever builds.

A model directory is data. Its `vlm.yaml` / `clip.yaml` names each part by a short registered `type` (`timm_vit`,
`hf_vision`, `mlp`, `pixel_shuffle`, `hf_causal_lm`, `hf_text`, ...) with plain arguments, and loading maps the
name through this registry: nothing read from a file is ever imported or called. Hugging Face towers and language
models are rebuilt from their stored config dict (`AutoConfig` / `from_config`); `trust_remote_code` comes from the
caller, never from the file, and a model directory's parts are always built with random weights (its own
safetensors fill them).

Directories written before `type` existed name their parts by Hydra `_target_` paths. Those still load when the path
is one of the registered classes below; any other path, and a `_target_` anywhere else in the file (for example a
`torch.load` of an inline pickle nested in a part's arguments), is refused with an error naming the key and the path.

Configs composed from `conf/` are the user's own and keep Hydra's `_target_` (they may name the user's code):
`build_part(..., trusted=True)`. Whatever is read back from disk - model directories, a run's `config.yaml` - is
built with `trusted=False`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

KINDS = ("encoder", "projector", "decoder", "text_encoder", "stage")
# Attention implementations a file may ask for: transformers also accepts hub repositories of kernels (code).
ATTENTION_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# Hydra keys an older directory may carry at a part's top level that change nothing about what is built.
_IGNORED_KEYS = ("_partial_", "_convert_", "_recursive_")


class UnsafeConfigError(ValueError):
    """A file names code to run (an unregistered type or path, or a nested `_target_`)."""


@functools.cache
def registry(kind: str) -> dict[str, Callable[..., Any]]:
    """type name -> class (or builder) of one kind of part; imported on first use (stages pull in Lightning)."""
    if kind == "encoder":
        from vlm.models.encoders.hf import HFVisionEncoder
        from vlm.models.encoders.timm_vit import TimmEncoder

        return {"timm_vit": TimmEncoder, "hf_vision": HFVisionEncoder}
    if kind == "projector":
        from vlm.models.projectors import GITProjector, LinearProjector, MLPProjector, PixelShuffleProjector

        return {"linear": LinearProjector, "mlp": MLPProjector, "mlp2x_gelu": MLPProjector, "git": GITProjector,
                "pixel_shuffle": PixelShuffleProjector}
    if kind == "decoder":
        from vlm.models.decoders import build_decoder

        return {"hf_causal_lm": build_decoder}
    if kind == "text_encoder":
        from vlm.models.text_encoders import TextEncoder

        return {"hf_text": TextEncoder}
    if kind == "stage":
        from vlm.stages.clip import ClipStage
        from vlm.stages.generative import GenerativeStage

        return {"generative": GenerativeStage, "clip": ClipStage}
    raise KeyError(f"unknown part kind {kind!r}; kinds: {KINDS}")


def import_path(builder: Callable[..., Any]) -> str:
    """The `_target_` path older model directories wrote for `builder`."""
    return f"{builder.__module__}.{builder.__qualname__}"


def _legacy_targets(kind: str) -> dict[str, str]:
    """registered import path -> type name (the first name of a class with aliases)."""
    out: dict[str, str] = {}
    for name, builder in registry(kind).items():
        out.setdefault(import_path(builder), name)
    return out


def type_name(kind: str, spec: Mapping[str, Any], where: str) -> str:
    """The registered type a part spec names (`type: NAME`, or an older directory's registered `_target_` path)."""
    if not isinstance(spec, Mapping):
        raise UnsafeConfigError(f"{where}: expected a part spec (a mapping with `type`), got {type(spec).__name__}")
    names = registry(kind)
    if "type" in spec and "_target_" in spec:
        raise UnsafeConfigError(f"{where}: give `type` or `_target_`, not both")
    if "type" in spec:
        name = spec["type"]
        if name not in names:
            raise UnsafeConfigError(f"{where}.type: {name!r} is not a registered {kind} type; "
                                    f"registered: {', '.join(sorted(names))}")
        return name
    if "_target_" in spec:
        path = spec["_target_"]
        legacy = _legacy_targets(kind)
        if path not in legacy:
            raise UnsafeConfigError(
                f"{where}._target_: {path!r} is not a registered {kind}; loading never imports a path named in a "
                f"file. Registered: {', '.join(f'{n} ({p})' for p, n in sorted(legacy.items()))}")
        return legacy[path]
    raise UnsafeConfigError(f"{where}: no `type`; registered {kind} types: {', '.join(sorted(names))}")


def nested_targets(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(key path, value) of every `_target_` inside `node` (mappings and lists, at any depth)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}"
            if key == "_target_":
                yield path, value
            else:
                yield from nested_targets(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from nested_targets(value, f"{where}[{i}]")


def refuse_targets(node: Any, where: str) -> None:
    """Raise on the first `_target_` anywhere inside `node`: data read from disk never names code."""
    for path, value in nested_targets(node, where):
        raise UnsafeConfigError(f"{path}: {value!r} is refused; a file read back from disk may name parts only by "
                                f"registered type, never code to import or call")


def check_file(data: Mapping[str, Any], parts: Mapping[str, str], where: str) -> None:
    """Check a whole loaded file before anything is built: each key of `parts` (key -> kind) present in `data` must
    name a registered type, and no other `_target_` may appear anywhere (inside a part's arguments included)."""
    for key, value in data.items():
        if key in parts and value is not None:
            type_name(parts[key], value, f"{where}: {key}")
            refuse_targets({k: v for k, v in value.items() if k != "_target_"}, f"{where}: {key}")
        else:
            refuse_targets(value, f"{where}: {key}")


def build(kind: str, spec: Mapping[str, Any], where: str, *, trust_remote_code: bool = False,
          pretrained: bool = False, **fill: Any) -> Any:
    """Build a part read back from disk through the registry.

    `trust_remote_code` (the caller's) replaces whatever the file says; `pretrained=False` (model directories, which
    carry their weights) builds Hugging Face parts from their stored config with random weights. `fill`: arguments
    the caller supplies (a projector's widths, a stage's model).
    """
    name = type_name(kind, spec, where)
    builder = registry(kind)[name]
    args = {k: v for k, v in spec.items() if k not in ("type", "_target_", *_IGNORED_KEYS)}
    refuse_targets(args, where)
    for key in args:
        if key.startswith("_") and key.endswith("_"):
            raise UnsafeConfigError(f"{where}.{key}: Hydra keys are not read from a file")
    accepted = inspect.signature(builder).parameters
    if "trust_remote_code" in accepted:
        args["trust_remote_code"] = bool(trust_remote_code)
    else:
        args.pop("trust_remote_code", None)
    if "pretrained" in accepted and not pretrained:
        args["pretrained"] = False
    if args.get("attn_implementation", None) not in ATTENTION_IMPLEMENTATIONS:
        raise UnsafeConfigError(f"{where}.attn_implementation: {args['attn_implementation']!r} is not one of "
                                f"{[a for a in ATTENTION_IMPLEMENTATIONS if a]}")
    try:
        return builder(**args, **fill)
    except TypeError as exc:
        raise ValueError(f"{where}: cannot build {kind} type {name!r}: {exc}") from exc


def build_part(kind: str, spec: Mapping[str, Any], where: str, *, trusted: bool,
               trust_remote_code: bool | None = None, pretrained: bool = True, **fill: Any) -> Any:
    """A part of a model config. `trusted`: the user's own config (conf/ and the command line), where a `type` goes
    through the registry and any Hydra `_target_` is instantiated (the user may name their own code). Otherwise the
    registry only (`build`), with `trust_remote_code` from the caller (None: False)."""
    if not trusted:
        return build(kind, spec, where, trust_remote_code=bool(trust_remote_code), pretrained=pretrained, **fill)
    if "type" in spec:
        own = spec.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
        return build(kind, spec, where, trust_remote_code=bool(own), pretrained=True, **fill)
    from hydra.utils import instantiate

    part = instantiate(spec, _convert_="all", **fill)
    return part() if isinstance(part, functools.partial) else part
