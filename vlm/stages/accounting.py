"""Token accounting of a stage's training batches: what padding (or its absence, with packing) costs.

`train/tokens` counts real tokens (attention mask 1) over all ranks since the stage started, `train/padding_share`
is padded slots over all slots, `train/tokens_per_s` is real tokens per second over the last logging interval. The
counts stay on the device between logging steps (no host sync per step); they are summed over ranks only when
logged, and once more for the end-of-stage line.
"""
from __future__ import annotations

import time
from typing import Any

import torch


class TokenAccounting:
    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None  # real tokens on this rank, a device scalar
        self.slots = 0  # all token slots (rows x row length) on this rank
        self.started: float | None = None
        self.carried = 0.0  # global tokens counted before a resume (not part of this run's rate)
        self._mark: tuple[float, float] | None = None  # (time, global tokens) at the last log

    def state_dict(self, strategy: Any = None) -> dict[str, float]:
        """The totals over all ranks, for a checkpoint (a collective, like the data module's state)."""
        tokens, slots = self.totals(strategy)
        return {"tokens": tokens, "slots": slots}

    def load_state_dict(self, state: dict[str, float], rank: int = 0) -> None:
        """Continue the totals after a resume: rank 0 carries them, so the sum over ranks is the checkpoint's."""
        tokens, slots = (float(state["tokens"]), float(state["slots"])) if rank == 0 else (0.0, 0.0)
        self.tokens = torch.tensor(tokens, dtype=torch.float64)
        self.slots = int(slots)
        self.carried = float(state["tokens"])
        self.started, self._mark = None, None

    def add(self, attention_mask: torch.Tensor) -> None:
        """Count one training batch (call it once per micro-batch)."""
        real = attention_mask.detach().ne(0).sum().double()
        self.tokens = real if self.tokens is None else self.tokens.to(real.device) + real
        self.slots += attention_mask.numel()
        if self.started is None:  # the rate counts from the first batch (not the loaders' start-up)
            self.started = time.perf_counter()

    def totals(self, strategy: Any = None) -> tuple[float, float]:
        """(real tokens, slots) summed over ranks (a collective when `strategy` spans several: call on all)."""
        device = self.tokens.device if self.tokens is not None else torch.device("cpu")
        counts = torch.stack([
            (self.tokens if self.tokens is not None else torch.zeros((), device=device)).double(),
            torch.tensor(float(self.slots), device=device, dtype=torch.float64),
        ])
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            counts = strategy.reduce(counts, reduce_op="sum")
        tokens, slots = counts.tolist()
        return tokens, slots

    def metrics(self, strategy: Any = None) -> dict[str, float]:
        """`train/tokens`, `train/padding_share` (so far) and `train/tokens_per_s` (since the last call)."""
        tokens, slots = self.totals(strategy)
        now = time.perf_counter()
        then, before = self._mark or (self.started or now, self.carried)
        self._mark = (now, tokens)
        out = {"train/tokens": tokens, "train/padding_share": 1.0 - tokens / slots if slots else 0.0}
        if now > then:
            out["train/tokens_per_s"] = (tokens - before) / (now - then)
        return out

    def summary(self, strategy: Any = None) -> str:
        """One line for the end of the stage: totals and the whole stage's rate."""
        tokens, slots = self.totals(strategy)
        elapsed = time.perf_counter() - self.started if self.started is not None else 0.0
        rate = f"{(tokens - self.carried) / elapsed:,.0f} tokens/s" if elapsed > 0 else "no timing"
        share = 1.0 - tokens / slots if slots else 0.0
        return (f"tokens: {tokens:,.0f} real in {slots:,.0f} slots (train/padding_share {share:.1%}), {rate} "
                "(train/tokens_per_s)")
