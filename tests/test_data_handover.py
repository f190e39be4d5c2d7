"""Batch hand-over from DataLoader workers: one shared-memory buffer per batch, reused only once released."""
from __future__ import annotations

import gc
import io
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's storage reductions with ForkingPickler)
from torch.multiprocessing.reductions import rebuild_storage_fd as _rebuild_storage_fd
from torch.utils.data import DataLoader, IterableDataset

from vlm.data.collate import Collator, Parts
from vlm.data.handover import BufferPool, pack_batch, unpack_batch
from vlm.data.images import ImageTransform


def _batch(fill: int) -> dict:
    pixels = [torch.full((1, 3, 4, 4), float(fill)), torch.arange(48, dtype=torch.float32).view(4, 4, 3)
              .permute(2, 0, 1).unsqueeze(0)]  # the second one strided (channels-last data, channels-first view)
    return {
        "input_ids": torch.full((2, 5), fill, dtype=torch.long),
        "mask": torch.tensor([True, False, True]),
        "half": torch.full((3,), fill, dtype=torch.bfloat16),
        "pixel_values": Parts(pixels),
        "keys": [f"k{fill}", "x"],
        "stream": {"position": fill},
    }


def _check(batch: dict, fill: int) -> None:
    assert list(batch) == ["input_ids", "mask", "half", "pixel_values", "keys", "stream"]
    assert batch["input_ids"].dtype == torch.long and torch.equal(batch["input_ids"], torch.full((2, 5), fill))
    assert torch.equal(batch["mask"], torch.tensor([True, False, True]))
    assert batch["half"].dtype == torch.bfloat16 and torch.equal(batch["half"].float(), torch.full((3,), float(fill)))
    expected = torch.cat([torch.full((1, 3, 4, 4), float(fill)),
                          torch.arange(48, dtype=torch.float32).view(4, 4, 3).permute(2, 0, 1).unsqueeze(0)])
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and torch.equal(batch["pixel_values"], expected)
    assert batch["keys"] == [f"k{fill}", "x"] and batch["stream"] == {"position": fill}


def _held(pool: BufferPool) -> list[int]:
    return [int(s.buffer.numpy()[0]) for s in pool.slots]


def test_round_trip_and_reuse_only_after_release() -> None:
    pool = BufferPool(size=4)
    first = unpack_batch(pack_batch(_batch(1), pool))
    _check(first, 1)
    assert _held(pool) == [1]
    pixels = first["pixel_values"][1:]  # a view outlives the batch dict
    del first
    gc.collect()
    assert _held(pool) == [1]
    second = unpack_batch(pack_batch(_batch(2), pool))  # must not overwrite the buffer `pixels` lives in
    assert len(pool.slots) == 2
    _check(second, 2)
    assert torch.equal(pixels[0, :, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    del pixels
    assert _held(pool) == [0, 1]
    third = unpack_batch(pack_batch(_batch(3), pool))  # the released buffer again, no new one
    assert len(pool.slots) == 2 and _held(pool) == [1, 1]
    _check(third, 3)
    _check(second, 2)


def test_pool_is_bounded_and_grows_for_larger_batches() -> None:
    pool = BufferPool(size=2)
    held = [unpack_batch(pack_batch(_batch(i), pool)) for i in range(4)]  # never released: fresh buffers
    assert len(pool.slots) == 2
    for i, batch in enumerate(held):
        _check(batch, i)
    del held, batch
    small = pool.slots[-1].buffer.numel()
    big = unpack_batch(pack_batch({"x": torch.zeros(4 * small)}, pool))
    assert pool.slots[-1].buffer.numel() > 4 * small * 4 and len(pool.slots) == 1  # the small free ones dropped
    assert torch.equal(big["x"], torch.zeros(4 * small))


def test_received_batch_releases_its_buffer_even_unread() -> None:
    pool = BufferPool(size=4)
    packed = pack_batch(_batch(5), pool)
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(packed)  # as a DataLoader worker sends it
    del packed
    gc.collect()
    assert _held(pool) == [1]  # the sender's copy going away does not release it
    received = pickle.loads(buffer.getvalue())
    _check(unpack_batch(dict(received)), 5)
    assert _held(pool) == [1]
    del received
    gc.collect()
    assert _held(pool) == [0]


class _Packing(IterableDataset):
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for i in range(info.id, 24, info.num_workers):
            yield pack_batch(_batch(i))


_RECEIVED: list[int] = []


def _counting_rebuild(*args):
    _RECEIVED.append(1)
    return _rebuild_storage_fd(*args)


@pytest.mark.parametrize("hold", [True, False])
def test_through_dataloader_workers(hold: bool, monkeypatch) -> None:
    """Batches held by the main process keep their contents while the workers go on packing; a buffer's file
    descriptor crosses over once, later batches in it name it by number."""
    import torch.multiprocessing.reductions as reductions

    from vlm.data import handover

    received = _RECEIVED
    received.clear()
    monkeypatch.setattr(reductions, "rebuild_storage_fd", _counting_rebuild)  # (the workers pickle it by name)
    loader = DataLoader(_Packing(), batch_size=None, num_workers=2, prefetch_factor=4, persistent_workers=True)
    for epoch in range(2):
        held = []
        for batch in loader:
            batch = unpack_batch(batch)
            fill = int(batch["stream"]["position"])
            _check(batch, fill)
            if hold:
                held.append((fill, batch))
        for fill, batch in held:
            _check(batch, fill)
        del held, batch
    pids = {w.pid for w in loader._iterator._workers}
    mapped = [key for key in handover._MAPPED if key[0] in pids]
    assert 0 < len(mapped) <= 2 * handover.POOL_SIZE  # forgotten buffers were unmapped
    if hold:  # every batch of an epoch held: each a fresh buffer, then the pools' ones again after the epoch
        assert len(received) == 48 - 2 * handover.POOL_SIZE
    else:
        assert len(received) < 20  # 48 batches
    del loader
    gc.collect()
    handover._forget_exited_workers()
    assert not [key for key in handover._MAPPED if key[0] in pids]


def test_lazy_collate_matches_eager() -> None:
    samples = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]),
                "pixel_values": torch.rand(n, 3, 2, 2)} for n in (1, 3)]
    eager = Collator(0)(samples)
    lazy = Collator(0)(samples, lazy=True)
    assert isinstance(lazy["pixel_values"], Parts)
    assert torch.equal(lazy["pixel_values"].materialize(), eager["pixel_values"])
    packed = unpack_batch(pack_batch(lazy, BufferPool()))
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(packed[key], eager[key])


def test_image_transform_is_contiguous_and_normalised() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    for tiles in (1, 4):
        pixels, grid = ImageTransform(8, mean, std, max_tiles=tiles)(image)
        assert pixels.is_contiguous()
        resized = np.asarray(image.resize((8, 8), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        expected = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
            std).view(3, 1, 1)
        torch.testing.assert_close(pixels[-1], expected, rtol=1e-5, atol=1e-5)  # the single tile or thumbnail
