"""Batch hand-over from DataLoader workers to the main process through one shared-memory buffer per batch.

torch's default hand-over shares each tensor of a batch separately, and each costs a round trip to the worker over a
socket to pass its file descriptor; `pack_batch` (in the worker) copies every CPU tensor of a batch into one buffer
from a pool the worker reuses, whose descriptor crosses over only the first time, and `unpack_batch` (in the main
process, `vlm.data.loader.StreamLoader`) gives back zero-copy views. It rests on a private torch API
(`UntypedStorage._new_shared`, docs/architecture.md); `benchmarks/README.md` has the end-to-end figures behind
keeping it.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import weakref
from typing import Any

import numpy as np
import torch

from vlm.data.collate import Parts

_ALIGN = 64          # every tensor of a packed buffer starts at a multiple of this (any dtype's alignment)
POOL_SIZE = 6       # shared buffers a worker keeps for reuse (batches in flight: prefetch_factor, plus those held)


def _new_shared(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` in fresh shared memory (no zero-filled copy first, as `share_memory_` makes)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


class _Slot:
    """One buffer of a worker's pool: its number in the pool, and whether the main process has mapped it yet."""

    __slots__ = ("buffer", "number", "sent")

    def __init__(self, buffer: torch.Tensor, number: int):
        self.buffer, self.number, self.sent = buffer, number, False


class BufferPool:
    """A worker's shared-memory buffers, reused once the main process has let go of the batch in them.

    Fresh shared memory costs a page fault per 4 KiB page on first write (about 15 ms for the 19 MB of a batch of
    32 images at 224 px, as much as the tensors' copy ten times over); a reused buffer is already mapped. Byte 0 of
    each buffer says who holds it: 1 from `take` in the worker until the main process drops every tensor of the
    batch (`_Lease`), then 0. A buffer still held is never written; when none is free a new one is made, and a
    full pool forgets its oldest (still held by the main process, e.g. a batch kept in a list: freed there when
    dropped, just not reused).

    The main process keeps its mapping of each buffer (`_MAPPED`), so a buffer's file descriptor crosses over once,
    not with every batch (torch passes one through a socket with an authentication handshake each time), and the
    main process does not fault the pages in again each time it reads a batch. Forgotten buffers are named in the
    next batch, and the main process unmaps them.
    """

    def __init__(self, size: int = POOL_SIZE):
        self.size = size
        self.slots: list[_Slot] = []
        self.forgotten: list[int] = []
        self.pid = os.getpid()
        self._numbers = itertools.count()

    def take(self, nbytes: int) -> _Slot:
        """A buffer of at least `nbytes` (header included), marked held."""
        if self.pid != os.getpid():  # a forked worker: its parent's buffers are shared with the parent, not its own
            self.slots, self.forgotten, self.pid = [], [], os.getpid()
        free = [s for s in self.slots if s.buffer.numpy()[0] == 0]
        fitting = [s for s in free if s.buffer.numel() >= nbytes]
        if fitting:
            chosen = min(fitting, key=lambda s: s.buffer.numel())
        else:
            # free ones are all too small: they would only ever be passed over
            drop = [s for s in self.slots if any(s is f for f in free)]
            if len(self.slots) - len(drop) >= self.size:
                drop.append(next(s for s in self.slots if not any(s is d for d in drop)))
            self.slots = [s for s in self.slots if not any(s is d for d in drop)]
            self.forgotten += [s.number for s in drop if s.sent]
            # slack for the next batches' longer texts or extra tiles, in whole pages
            chosen = _Slot(_new_shared(-(-(nbytes + nbytes // 8) // 4096) * 4096), next(self._numbers))
            self.slots.append(chosen)
        chosen.buffer.numpy()[0] = 1
        return chosen

    def pop_forgotten(self) -> list[int]:
        forgotten, self.forgotten = self.forgotten, []
        return forgotten


_POOL = BufferPool()
_MAPPED: dict[tuple[int, int], torch.Tensor] = {}  # main process: (worker pid, buffer number) -> its mapping


class _Lease:
    """Held (through numpy's `base`) by every tensor `unpack_batch` makes from one buffer; when the last of them
    is gone, byte 0 of the buffer is set to 0 and the worker may write the buffer again."""

    def __init__(self, buffer: torch.Tensor):
        self.__array_interface__ = {"data": (buffer.data_ptr(), False), "shape": (buffer.numel(),),
                                    "typestr": "|u1", "version": 3}
        self.buffer = buffer
        weakref.finalize(self, _release, buffer[:1].numpy())


def _release(flag: np.ndarray) -> None:
    flag[0] = 0


class _Packed:
    """A packed batch's buffer and layout. Pickled (worker -> main) as the buffer's pool number and the layout,
    plus the buffer itself (torch shares its memory by file descriptor) the first time; the receiving side takes
    the lease, so dropping a batch unread also frees it."""

    def __init__(self, buffer: torch.Tensor, layout: list[tuple], order: list[str], slot: _Slot | None = None,
                 forgotten: list[int] | None = None):
        self.buffer, self.layout, self.order = buffer, layout, order
        self.slot, self.forgotten = slot, forgotten or []

    def __reduce__(self) -> tuple:
        if self.slot is None:
            return _received, (self.buffer, self.layout, self.order)
        first = not self.slot.sent  # pickled once per batch, in order, by the worker's queue thread
        self.slot.sent = True
        return _received, (self.buffer if first else None, self.layout, self.order,
                           (os.getpid(), self.slot.number, self.forgotten))

    def pin_memory(self, device: Any = None) -> _Packed:
        """DataLoader(pin_memory=True): the whole buffer copied to pinned memory at once (the shared one is
        released when this object goes)."""
        pinned = self.buffer.pin_memory() if device is None else self.buffer.pin_memory(device)
        return _Packed(pinned, self.layout, self.order)

    def tensors(self) -> dict[str, torch.Tensor]:
        lease = getattr(self, "lease", None)
        if lease is None and self.buffer.is_shared():  # unpacked in the process that packed it
            lease = self.lease = _Lease(self.buffer)
        raw = np.asarray(lease) if lease is not None else self.buffer.numpy()
        out = {}
        for key, start, dtype, shape in self.layout:
            size = math.prod(shape) * _itemsize(dtype)
            out[key] = torch.from_numpy(raw[start : start + size]).view(dtype).view(shape)
        return out


def _received(buffer: torch.Tensor | None, layout: list[tuple], order: list[str],
              pooled: tuple[int, int, list[int]] | None = None) -> _Packed:
    if pooled is not None:
        pid, number, forgotten = pooled
        for gone in forgotten:
            _MAPPED.pop((pid, gone), None)
        if buffer is not None:
            _forget_exited_workers()
            _MAPPED[(pid, number)] = buffer
        else:
            buffer = _MAPPED.get((pid, number))
            if buffer is None:
                raise RuntimeError(f"batch in buffer {number} of worker {pid}, which this process never received")
    packed = _Packed(buffer, layout, order)
    packed.lease = _Lease(buffer)
    return packed


def _forget_exited_workers() -> None:
    """Unmap the buffers of workers that have exited (a finished DataLoader's), so their memory is freed."""
    alive = {p.pid for p in multiprocessing.active_children()} | {os.getpid()}
    for key in [k for k in _MAPPED if k[0] not in alive]:
        del _MAPPED[key]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_cpu_tensor(value: Any) -> bool:
    return isinstance(value, Parts) or (isinstance(value, torch.Tensor) and value.device.type == "cpu")


def pack_batch(batch: dict[str, Any], pool: BufferPool | None = None) -> dict[str, Any]:
    """In a worker: every CPU tensor of the batch (and `Parts`) copied into one shared-memory buffer.

    torch's default hand-over shares each tensor separately, and each costs a round trip to the worker over a
    socket to pass its file descriptor; on a busy machine that is milliseconds per tensor, several per batch.
    One buffer costs one round trip. Buffers come from the worker's pool (reused once the main process has
    dropped the batch's tensors). `unpack_batch` (in `StreamLoader`) gives back views of it, zero-copy.
    """
    tensors = [(k, v) for k, v in batch.items() if _is_cpu_tensor(v)]
    if not tensors:
        return batch
    layout, offset = [], _ALIGN  # bytes before the first tensor: the buffer's header (byte 0: held flag)
    for key, value in tensors:
        offset = -(-offset // _ALIGN) * _ALIGN
        layout.append((key, offset, value.dtype, tuple(value.shape)))
        offset += math.prod(value.shape) * _itemsize(value.dtype)
    pool = pool or _POOL
    slot = pool.take(offset)
    buffer = slot.buffer
    raw = buffer.numpy()
    for (key, start, dtype, _), (_, value) in zip(layout, tensors):
        for part in value.tensors if isinstance(value, Parts) else [value]:
            size = part.numel() * _itemsize(dtype)
            target = raw[start : start + size]
            if part.is_contiguous():  # numpy: one thread, a plain copy
                target[:] = part.reshape(-1).view(torch.uint8).numpy()
            else:  # one strided copy straight into place, not .contiguous() and then a copy
                target = torch.from_numpy(target).view(dtype).view(part.shape)
                try:
                    np.copyto(target.numpy(), part.numpy())
                except TypeError:  # a dtype numpy lacks (bfloat16)
                    target.copy_(part)
            start += size
    packed = {k: v for k, v in batch.items() if not _is_cpu_tensor(v)}
    packed["__packed__"] = _Packed(buffer, layout, list(batch), slot, pool.pop_forgotten())
    return packed


def unpack_batch(batch: Any) -> Any:
    """The batch `pack_batch` packed, its tensors as views of the shared buffer, keys in their order."""
    if not isinstance(batch, dict) or "__packed__" not in batch:
        return batch
    packed = batch.pop("__packed__")
    tensors = packed.tensors()
    return {k: tensors[k] if k in tensors else batch[k] for k in packed.order}
