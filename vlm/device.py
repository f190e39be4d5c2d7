"""Where inference runs: the `device=` and `dtype=` of evaluate.py, the chat, the judge and nearest tokens.

`device=auto` is CUDA when it is available, else the CPU. `dtype=auto` follows the device: bf16 on CUDA (fp16 on a GPU
without bf16), fp32 on the CPU, where bf16 matmuls are slow and fp32 is exact. Any torch device string (`cuda:1`,
`cpu`, `mps`) and dtype name (`bfloat16`/`bf16`, `float16`/`fp16`, `float32`/`fp32`) may be given.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_device(device: str | torch.device | None = "auto",
                   dtype: str | torch.dtype | None = "auto") -> tuple[torch.device, torch.dtype]:
    """(torch device, torch dtype) from the command line's strings; None means `auto`."""
    if device is None or str(device) == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a torch device (auto, cpu, cuda, cuda:1, mps, ...)") from exc
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device=auto or device=cpu")
    if isinstance(dtype, torch.dtype):
        return resolved, dtype
    if dtype is None or str(dtype) == "auto":
        if resolved.type != "cuda":
            return resolved, torch.float32
        return resolved, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return resolved, DTYPES[name]


def place(model: nn.Module, device: str | torch.device | None = "auto",
          dtype: str | torch.dtype | None = "auto") -> nn.Module:
    """The model moved to the resolved device, its floating-point weights cast to the resolved dtype, in eval mode."""
    resolved, resolved_dtype = resolve_device(device, dtype)
    return model.to(device=resolved, dtype=resolved_dtype).eval()


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's weights (inputs are moved there)."""
    return next(model.parameters()).device
