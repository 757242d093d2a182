r"""The student's input ``(x_s, t_s)`` for one loss call, and the unrolls that make it.

``student_sample_steps`` = K:

- K = 1: :math:`t_s = \text{max\_t}`, :math:`x_s = \text{max\_t}\,\epsilon`.
- K > 1: each sample draws its own rung :math:`k \sim U\{0..K-1\}` of ``t_list`` and
  :math:`x_s = \text{add\_noise}(x_0, \epsilon, t_k)` on real latents, or, with
  ``backward_simulation``, on the current student's own sample: the student is unrolled without
  grad from pure noise through rungs :math:`0..K-2` (always all of them, so the graph and the
  call count do not depend on the draw), each sample keeps the x0 produced after its k-th call,
  and rung 0 starts from :math:`t_0 \epsilon`. Cost: K - 1 gradient-free student forwards per
  loss call (``rung_sampling="stratified"`` runs call j on the rows that need it only).

The student enters as a callable ``student_x0(x, t, encoder_hidden_states, model_kwargs)``
returning its x0, so this file knows nothing of networks or of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastgen.dmd.calls import is_per_sample
from fastgen.dmd.config import DMDConfig
from fastgen.flow_matching import add_noise, x0_to_eps
from fastgen.precision import compute_dtype, compute_once
from fastgen.timesteps import rungs_at, sample_from_t_list

__all__ = ["StudentInput", "StudentX0"]

StudentX0 = Callable[[Tensor, Tensor, "Tensor | None", dict[str, Any]], Tensor]


def _rung_mask(k: Tensor, j: int, like: Tensor) -> Tensor:
    return (k == j).reshape(-1, *([1] * (like.ndim - 1)))


def _scaled(noise: Tensor, t: float) -> Tensor:
    """``t * noise`` rounded once to ``noise``'s dtype."""
    return compute_once(lambda e: e * t, noise, dtype=noise.dtype)


def _gather_per_sample(
    kwargs: dict[str, Any], index: Tensor, n: int
) -> tuple[dict[str, Any], set[str]]:
    """``kwargs`` with every batch-shaped tensor (first dim ``n``) gathered at ``index``."""
    out, gathered = {}, set()
    for key, value in kwargs.items():
        if is_per_sample(value, n):
            out[key] = value.index_select(0, index)
            gathered.add(key)
        elif isinstance(value, (list, tuple)) and len(value) == n and n > 1:
            raise ValueError(
                f"rung_sampling='stratified' gathers per-sample keyword arguments on the device: "
                f"pass {key!r} as a tensor (batch first), not a {type(value).__name__} of {n}"
            )
        else:
            out[key] = value
    return out, gathered


class StudentInput:
    """The student's input from a config's ``student_sample_steps``, ``sample_t_cfg``,
    ``backward_simulation``, ``student_sample_type`` and ``rung_sampling`` (fixed at
    construction: static under ``torch.compile``).

    Args:
        config: The DMD2 config.
    """

    def __init__(self, config: DMDConfig) -> None:
        self.steps = config.student_sample_steps
        self.t_list = config.sample_t_cfg.t_list
        self.max_t = config.sample_t_cfg.max_t
        self.backward_simulation = config.backward_simulation
        self.sample_type = config.student_sample_type
        self.stratified = config.rung_sampling == "stratified"

    def __call__(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None,
        model_kwargs: dict[str, Any],
        student_x0: StudentX0,
    ) -> tuple[Tensor, Tensor]:
        """``(x_s, t_s)``: the student's input in ``noise``'s dtype and its float32 time ``[B]``."""
        n, device = latents.shape[0], noise.device
        if self.steps == 1:
            t_s = torch.full((n,), self.max_t, device=device, dtype=torch.float32)
            return _scaled(noise, self.max_t), t_s
        if self.stratified:
            order, sorted_k, position = self._stratified_rungs(n, device)
            k = sorted_k.index_select(0, position)
            t_s = rungs_at(k, self.t_list, dtype=torch.float32)
        else:
            t_s, k = sample_from_t_list(
                n, self.t_list, device=device, dtype=torch.float32, return_index=True
            )
        if not self.backward_simulation:
            return add_noise(latents, noise, t_s), t_s
        ehs = encoder_hidden_states
        pure = _scaled(noise, self.t_list[0])
        with torch.no_grad():
            if self.stratified:
                x0_sorted = self._unroll_stratified(
                    noise, ehs, model_kwargs, student_x0, order, sorted_k
                )
                x0_at_k = x0_sorted.index_select(0, position)
            else:
                x0_at_k = self._unroll(noise, k, ehs, model_kwargs, student_x0)
            x_s = torch.where(_rung_mask(k, 0, noise), pure, add_noise(x0_at_k, noise, t_s))
        return x_s, t_s

    def _next_state(self, x0_hat: Tensor, x: Tensor, t_j: Tensor, t_next: float) -> Tensor:
        """The unrolled student's sample re-noised at the next rung: with the noise that ``x``
        implies (``ode``) or with fresh noise (``sde``)."""
        if self.sample_type == "ode":
            step_noise = x0_to_eps(x0_hat, x, t_j)
        else:
            step_noise = torch.randn_like(x0_hat)
        return add_noise(x0_hat, step_noise, torch.full_like(t_j, t_next))

    def _start(self, fresh: Tensor, like: Tensor) -> Tensor:
        """The unroll's start: fresh noise (drawn in the compute dtype; the student's own
        sample, independent of the loss call's noise) at rung 0, rounded once."""
        return compute_once(lambda e: e * self.t_list[0], fresh, dtype=like.dtype)

    def _unroll(
        self,
        noise: Tensor,
        k: Tensor,
        ehs: Tensor | None,
        model_kwargs: dict[str, Any],
        student_x0: StudentX0,
    ) -> Tensor:
        """Each sample's x0 after its k-th student call (zeros at rung 0): every call on the
        whole batch."""
        n, ladder = noise.shape[0], self.t_list
        x = self._start(torch.randn_like(noise, dtype=compute_dtype(noise.device)), noise)
        x0_at_k = torch.zeros_like(noise)
        for j in range(self.steps - 1):
            t_j = torch.full((n,), ladder[j], device=noise.device, dtype=torch.float32)
            x0_hat = student_x0(x, t_j, ehs, model_kwargs)
            x0_at_k = torch.where(_rung_mask(k, j + 1, noise), x0_hat, x0_at_k)
            if j + 1 < self.steps - 1:
                x = self._next_state(x0_hat, x, t_j, ladder[j + 1])
        return x0_at_k

    def _stratified_rungs(self, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``rung_sampling="stratified"``: a random order of the samples, the rung at each
        position (non-increasing), and each sample's position in the order.

        Position i holds rung K-1 - (K i + r) // n with r ~ U{0..K-1}: every sample's rung is
        uniform, the groups' sizes differ by at most one, and at most
        ceil((K-1-j) n / K) positions hold a rung above j (a size fixed by n).
        """
        steps = self.steps
        order = torch.randperm(n, device=device)
        offset = torch.randint(0, steps, (), device=device)
        sorted_k = (steps - 1) - (steps * torch.arange(n, device=device) + offset) // n
        position = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=device))
        return order, sorted_k, position

    def _unroll_stratified(
        self,
        noise: Tensor,
        ehs: Tensor | None,
        model_kwargs: dict[str, Any],
        student_x0: StudentX0,
        order: Tensor,
        sorted_k: Tensor,
    ) -> Tensor:
        """:meth:`_unroll` in the stratified order: call j + 1 runs only on the first
        ceil((K-1-j) n / K) positions, the ones whose rung can be above j. Returns x0 by
        position."""
        n, steps, ladder, device = noise.shape[0], self.steps, self.t_list, noise.device
        rows = [((steps - 1 - j) * n + steps - 1) // steps for j in range(steps - 1)]
        take = order[: rows[0]]
        ehs_sorted = None if ehs is None else ehs.index_select(0, take)
        kwargs_sorted, gathered = _gather_per_sample(model_kwargs, take, n)
        wide = compute_dtype(device)
        x = self._start(torch.randn((rows[0], *noise.shape[1:]), device=device, dtype=wide), noise)
        x0_sorted = torch.zeros_like(noise)
        for j in range(steps - 1):
            m = rows[j]
            x = x[:m]
            t_j = torch.full((m,), ladder[j], device=device, dtype=torch.float32)
            kwargs_j = {
                key: value[:m] if key in gathered else value for key, value in kwargs_sorted.items()
            }
            cond = None if ehs_sorted is None else ehs_sorted[:m]
            x0_hat = student_x0(x, t_j, cond, kwargs_j)
            keep = _rung_mask(sorted_k[:m], j + 1, x0_hat)
            x0_sorted = torch.cat([torch.where(keep, x0_hat, x0_sorted[:m]), x0_sorted[m:]])
            if j + 1 < steps - 1:
                x = self._next_state(x0_hat, x, t_j, ladder[j + 1])
        return x0_sorted
