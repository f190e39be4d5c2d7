"""Wrong-typed config values are errors before anything is built, naming the key.

`trainer.max_steps=abc` would otherwise surface minutes later, after the model is built, as a `TypeError` deep in
Lightning that does not say which setting was wrong. The check reads the type hints of what each config node is
given to (`lightning.Trainer` for `trainer`, the node's `_target_` for `data` and `stage`, known keys for `optim`)
and reports a plain value none of whose accepted scalar types fits. Values it cannot judge (lists, dicts, types it
does not know) pass: the check only ever rejects what would certainly fail.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

# `optim` is read key by key by the stages (`vlm.stages.base.Stage.configure_optimizers`)
OPTIM_TYPES: dict[str, Any] = {"lr": float, "weight_decay": float, "eps": float, "warmup_ratio": float,
                               "warmup_steps": int | None, "scheduler": str}
GUARD_TYPES: dict[str, Any] = {"nonfinite_loss": str, "max_consecutive_skips": int | None}


class ConfigTypeError(TypeError):
    """A config value of a type its setting cannot take."""


def _scalar_types(hint: Any) -> set[type] | None:
    """The plain types a hint accepts (int, float, bool, str, NoneType), or None when it accepts anything else too
    (then the value is not judged)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return None
    if origin in (typing.Union, types.UnionType):
        out: set[type] = set()
        for arg in typing.get_args(hint):
            sub = _scalar_types(arg)
            if sub is None:
                if typing.get_origin(arg) in (list, dict, tuple, Mapping) or arg in (list, dict, tuple):
                    continue  # a container: a scalar never fits it
                return None
            out |= sub
        return out
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(hint)}
    if hint in (int, float, bool, str, type(None)):
        return {hint}
    return None


def _fits(value: Any, accepted: set[type]) -> bool:
    if value is None:
        return type(None) in accepted
    if isinstance(value, bool):
        return bool in accepted
    if isinstance(value, int):
        return bool({int, float} & accepted)
    if isinstance(value, float):
        return float in accepted or (int in accepted and value.is_integer())
    if isinstance(value, str):
        return str in accepted
    return True


def _describe(accepted: set[type]) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}
    if float in accepted:
        accepted = accepted - {int}
    return " or ".join(names[t] for t in (int, float, bool, str, type(None)) if t in accepted)


def check_values(values: Mapping[str, Any], hints: Mapping[str, Any], prefix: str) -> None:
    """Raise `ConfigTypeError` naming `prefix.key` for the first scalar value its hint cannot take."""
    for key, value in values.items():
        if key not in hints or isinstance(value, (list, dict, Mapping)) or not isinstance(
                value, (str, int, float, bool, type(None))):
            continue
        accepted = _scalar_types(hints[key])
        if accepted and not _fits(value, accepted):
            name = key if prefix == "cfg" else f"{prefix}.{key}"
            raise ConfigTypeError(f"{name}={value!r}: expected {_describe(accepted)} (the setting's type), got "
                                  f"{type(value).__name__}")


def init_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """Type hints of a class's `__init__` (or a function), {} when they cannot be resolved."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable forward references: nothing to check against
        return {}


def _target_hints(node: Mapping[str, Any]) -> dict[str, Any]:
    from hydra.utils import get_object

    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str):
        return {}
    try:
        return init_hints(get_object(target))
    except Exception:  # noqa: BLE001 - an unknown target fails on its own, with Hydra's message
        return {}


def check_config_types(cfg: Any) -> None:
    """Check the training config's `trainer`, `data`, `stage`, `optim` and `guards` values (see module doc)."""
    from omegaconf import DictConfig, OmegaConf

    def plain(name: str) -> dict[str, Any]:
        node = cfg.get(name) if cfg is not None else None
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        return dict(node) if isinstance(node, Mapping) else {}

    trainer = plain("trainer")
    if trainer:
        check_values(trainer, _target_hints(trainer), "trainer")
    for name in ("data", "stage"):
        node = plain(name)
        check_values(node, _target_hints(node), name)
    check_values(plain("optim"), OPTIM_TYPES, "optim")
    check_values(plain("guards"), GUARD_TYPES, "guards")
    if cfg is not None and "seed" in cfg:
        check_values({"seed": cfg.get("seed")}, {"seed": int}, "cfg")
