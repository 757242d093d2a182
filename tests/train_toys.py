"""Networks and data for the trainer tests, named in run configs as ``train_toys:networks`` and
``train_toys:data`` (tests/ is on the path of the CLI subprocesses)."""

from __future__ import annotations

import time

import torch
from toys import ToyDiT, ToyTokenDiscriminator

import fastgen


def networks(run) -> dict:
    teacher = ToyDiT(dim=16, depth=2)
    nets = {"teacher": teacher}
    if run.dmd_config().gan_loss_weight_gen > 0:
        fastgen.attach_feature_capture(teacher, [0, 1], blocks="transformer_blocks")
        nets["discriminator"] = ToyTokenDiscriminator(dim=16)
    return nets


class Interrupted(RuntimeError):
    """Raised by ``Data`` at call ``stop_at``: a run that dies mid-iteration."""


class Data:
    """Batches from the global RNG; ``nan_at`` makes the conditioning NaN from that call on;
    ``stop_at`` raises :class:`Interrupted` at that call (counted over the run's lifetime)."""

    def __init__(self, batch: int = 2, nan_at: int | None = None, stop_at: int | None = None,
                 delay: float = 0.0):  # fmt: skip
        self.batch, self.nan_at, self.stop_at, self.calls = batch, nan_at, stop_at, 0
        self.delay = delay

    def __call__(self) -> dict:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)  # a slow loader: a signal meets the run mid-iteration
        if self.stop_at is not None and self.calls == self.stop_at:
            raise Interrupted(f"stopped at data call {self.calls}")
        latents = torch.randn(self.batch, 4, 8, 8)
        cond = torch.randn(self.batch, 3, 8)
        if self.nan_at is not None and self.calls >= self.nan_at:
            cond = cond * float("nan")
        return {"latents": latents, "encoder_hidden_states": cond,
                "negative_encoder_hidden_states": torch.zeros_like(cond)}  # fmt: skip

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def data(run, rank: int, world: int) -> Data:
    return Data()


def sd3_data(run, rank: int, world: int):
    """Batches for the tiny SD3 pipeline's transformer (tests/families.py's saver)."""

    def batch() -> dict:
        cond = torch.randn(2, 5, 16)
        return {"latents": torch.randn(2, 4, 8, 8), "encoder_hidden_states": cond,
                "pooled_projections": torch.randn(2, 16),
                "negative_encoder_hidden_states": torch.zeros_like(cond[:1]),
                "negative_pooled_projections": torch.zeros(1, 16)}  # fmt: skip

    return batch


def slow_data(run, rank: int, world: int) -> Data:
    return Data(delay=0.05)
