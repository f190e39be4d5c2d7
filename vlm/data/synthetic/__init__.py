"""Synthetic datasets generated offline (`ensure_shapes` builds the shapes world)."""
from typing import Any


def __getattr__(name: str) -> Any:  # lazy, so `python -m vlm.data.synthetic.shapes` imports the module once
    if name == "ensure_shapes":
        from vlm.data.synthetic.shapes import ensure_shapes

        return ensure_shapes
    raise AttributeError(name)
