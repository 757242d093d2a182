"""Stateless ``nn.Module`` wrappers: a frozen config in, the pure functions in ``forward``.

They hold no parameters and no persistent state (an empty ``state_dict``), so they drop into a
model that is compiled, exported, wrapped in DDP/FSDP, deep-copied or pickled. Everything that
``forward`` branches on is a Python constant fixed in ``__init__``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastgen.config import ParamConverterConfig, SampleTimestepConfig
from fastgen.flow_matching import add_noise, convert_prediction
from fastgen.timesteps import sample_from_t_list, sample_timesteps

__all__ = ["ParamConverter", "RFForward", "TimestepSampler"]


class RFForward(nn.Module):
    r"""The RF forward process as a module: ``forward(x0, eps, t)`` is :func:`~fastgen.add_noise`.

    .. math::

        x_t = (1 - t)\, x_0 + t\, \epsilon

    Returns ``x_t`` in ``x0``'s dtype (the policy's dtype inside, one rounding).

    Example:
        >>> import torch
        >>> RFForward()(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
        tensor([[1., 1., 1.],
                [0., 0., 0.]])
    """

    def forward(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return add_noise(x0, eps, t)


class ParamConverter(nn.Module):
    r"""Convert predictions from parameterization ``src`` to ``dst`` (``x0``, ``eps``, ``flow``).

    ``forward(pred, x_t, t)`` is :func:`~fastgen.convert_prediction`; the output is in
    ``x_t``'s dtype (the policy's dtype inside, one rounding). Flow <-> x0 and flow -> eps are division
    free (:math:`x_0 = x_t - t v`, :math:`\epsilon = x_t + (1 - t) v`), hence exact everywhere.

    Args:
        src: What the model predicts.
        dst: What the caller needs.

    Raises:
        pydantic.ValidationError: ``src`` or ``dst`` is not one of the three names.

    Example:
        >>> import torch
        >>> conv = ParamConverter("flow", "x0")
        >>> conv(torch.tensor([[-1.0]]), torch.tensor([[1.5]]), torch.tensor([0.5]))
        tensor([[2.]])
    """

    def __init__(self, src: str, dst: str) -> None:
        super().__init__()
        self.config = ParamConverterConfig(src=src, dst=dst)
        # Plain strings: what forward branches on is a constant for torch.compile.
        self.src: str = self.config.src
        self.dst: str = self.config.dst

    def forward(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return convert_prediction(pred, x_t, t, src=self.src, dst=self.dst)

    def extra_repr(self) -> str:
        return f"src={self.src!r}, dst={self.dst!r}"


class TimestepSampler(nn.Module):
    """Draw training timesteps for a batch from a :class:`~fastgen.SampleTimestepConfig`.

    ``forward(x)`` returns float32 ``t`` of shape ``[x.shape[0]]`` on ``x``'s device, drawn by
    :func:`~fastgen.sample_timesteps`. :meth:`sample_t_list` draws the student's rungs from
    ``cfg.t_list`` with their indices; the ladder is also kept as a non-persistent float32
    buffer ``t_list`` (the rungs exactly as the samples hold them; float32 also moves to MPS) (it follows ``.to(device)``, stays out of ``state_dict``), so the next
    rung is ``sampler.t_list[k + 1]``, looked up on device. No generator: every draw uses the
    device's default RNG, so it compiles, exports and captures in CUDA graphs; seed each DDP
    rank differently to give ranks different timesteps.

    Args:
        cfg: The distribution (and optional ladder).

    Example:
        >>> import torch
        >>> sampler = TimestepSampler(SampleTimestepConfig(t_list=[0.999, 0.5, 0.0]))
        >>> t = sampler(torch.zeros(8, 3))
        >>> t.shape, t.dtype
        (torch.Size([8]), torch.float32)
        >>> t, k = sampler.sample_t_list(torch.zeros(8, 3))
        >>> bool((sampler.t_list[k].float() == t).all())
        True
    """

    t_list: Tensor | None

    def __init__(self, cfg: SampleTimestepConfig) -> None:
        super().__init__()
        if not isinstance(cfg, SampleTimestepConfig):
            raise TypeError(f"cfg must be a SampleTimestepConfig, got {type(cfg).__name__}")
        self.config = cfg
        ladder = None if cfg.t_list is None else torch.tensor(cfg.t_list, dtype=torch.float32)
        self.register_buffer("t_list", ladder, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return sample_timesteps(x.shape[0], self.config, device=x.device, dtype=torch.float32)

    def sample_t_list(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Draw one rung of ``cfg.t_list[:-1]`` per sample: ``(t, k)``, t float32, k int64."""
        if self.config.t_list is None:
            raise ValueError("sample_t_list needs cfg.t_list, which is None")
        return sample_from_t_list(
            x.shape[0], self.config.t_list, device=x.device, dtype=torch.float32, return_index=True
        )

    def extra_repr(self) -> str:
        return repr(self.config)
