"""Contrastive losses: equal to their definitions, and under 2 gloo processes (gathered negatives, DDP gradient mean)
equal to the single-process loss and gradients on the concatenated batch."""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm.losses import contrastive_loss, distributed_loss, gather_features, siglip_loss
from vlm.models.clip import ContrastiveHead


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_contrastive_loss_is_symmetric_infonce() -> None:
    x, y, s = unit_rows(6, 5, 0), unit_rows(6, 5, 1), 7.3
    total = 0.0
    for i in range(6):  # image i against all texts, text i against all images
        sims_i2t = [s * float(x[i] @ y[j]) for j in range(6)]
        sims_t2i = [s * float(y[i] @ x[j]) for j in range(6)]
        total += -sims_i2t[i] + math.log(sum(math.exp(v) for v in sims_i2t))
        total += -sims_t2i[i] + math.log(sum(math.exp(v) for v in sims_t2i))
    expected = total / (2 * 6)
    assert float(contrastive_loss(x, y, torch.tensor([s], dtype=torch.float64))) == pytest.approx(expected, rel=1e-12)


def test_siglip_loss_sums_pairs_over_batch_size() -> None:
    x, y, s, b = unit_rows(5, 4, 2), unit_rows(5, 4, 3), 10.0, -10.0
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * (s * float(x[i] @ y[j]) + b))))
    got = siglip_loss(x, y, torch.tensor([s], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
    assert float(got) == pytest.approx(total / 5, rel=1e-12)


def test_rows_against_columns_split_the_global_loss() -> None:
    """Two halves scored against all columns (offset = the half's start) average to the whole batch's loss."""
    x, y = unit_rows(8, 6, 4), unit_rows(8, 6, 5)
    s, b = torch.tensor([4.0], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    halves = [contrastive_loss(x[k:k + 4], y[k:k + 4], s, x, y, k) for k in (0, 4)]
    torch.testing.assert_close(sum(halves) / 2, contrastive_loss(x, y, s))
    halves = [siglip_loss(x[k:k + 4], y[k:k + 4], s, b, y, k) for k in (0, 4)]
    torch.testing.assert_close(sum(halves) / 2, siglip_loss(x, y, s, b))
    with pytest.raises(ValueError, match="offset"):
        contrastive_loss(x[:4], y[:4], s, x, y, 5)


def test_single_process_gather_is_identity() -> None:
    x = torch.randn(3, 2)
    gathered, offset = gather_features(x)
    assert gathered is x and offset == 0


# ---- 2 processes (gloo) ------------------------------------------------------------------------------------------
BATCH, IMAGE_DIM, TEXT_DIM, EMBED = 8, 5, 7, 4


class Toy(nn.Module):
    """Linear towers + the real head; its loss is the stage's `distributed_loss`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(IMAGE_DIM, EMBED)
        self.text = nn.Linear(TEXT_DIM, EMBED)
        self.head = ContrastiveHead(kind)
        self.kind = kind

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        x, y = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        return distributed_loss(self.kind, x, y, self.head.logit_scale.exp(), self.head.logit_bias)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, IMAGE_DIM, generator=g), torch.randn(BATCH, TEXT_DIM, generator=g)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        images, texts = global_batch()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        results = {}
        for kind in ("clip", "siglip"):
            model = nn.parallel.DistributedDataParallel(Toy(kind))  # averages gradients over ranks
            loss = model(images[rows], texts[rows])
            loss.backward()
            results[kind] = {"loss": loss.detach(),
                             "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}}
        torch.save(results, Path(out) / f"rank{rank}.pt")
        del model
        # both ranks done before either tears gloo down: destroying the group while the peer's DDP still talks
        # aborted a worker now and then ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    world = 2
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError("the 2-process gloo workers did not finish in 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    images, texts = global_batch()
    for kind in ("clip", "siglip"):
        model = Toy(kind)
        loss = model(images, texts)  # one process: the plain loss over the whole batch
        loss.backward()
        mean_loss = sum(r[kind]["loss"] for r in ranks) / world
        torch.testing.assert_close(mean_loss, loss.detach(), atol=1e-6, rtol=1e-6)
        for name, param in model.named_parameters():
            assert param.grad.abs().sum() > 0, f"{kind}: no gradient reaches {name}"
            for r in ranks:
                torch.testing.assert_close(r[kind]["grads"][name], param.grad, atol=1e-6, rtol=1e-5,
                                           msg=lambda m, n=name, k=kind: f"{k} gradient of {n}: {m}")
        assert not torch.allclose(ranks[0][kind]["loss"], ranks[1][kind]["loss"])  # each rank scored its own rows
