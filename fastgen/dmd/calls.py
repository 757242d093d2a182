r"""How the pipeline calls a network: diffusers keywords in, one checked tensor out.

:class:`NetworkCall` is the adapter between DMD2's latents ``[B, ...]`` and a network's
signature: ``model(hidden_states=x_t, timestep=t, encoder_hidden_states=c, **model_kwargs)``,
with ``timestep`` rescaled to ``t * num_train_timesteps`` when that is set. A model family
whose transformer wants another layout (Qwen-Image's packed 2x2 patches,
:class:`fastgen.plugins.qwen_image.QwenImageCall`) overrides :meth:`NetworkCall.forward`.
:func:`batched_teacher` runs the conditional and unconditional teacher calls of CFG as one
call of batch 2B.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastgen.checks import check_pair
from fastgen.precision import compute_once

__all__ = [
    "RESERVED",
    "NetworkCall",
    "batched_teacher",
    "check_kwargs",
    "is_per_sample",
    "unwrap_output",
]

# The keyword arguments the pipeline itself passes to every network.
RESERVED = ("hidden_states", "timestep", "encoder_hidden_states")


def unwrap_output(out: Any, role: str) -> Tensor:
    """A diffusers-style output: a tensor, a tuple (first element), or ``.sample``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and len(out) > 0 and isinstance(out[0], Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise TypeError(
        f"the {role} returned {type(out).__name__}; expected a Tensor, a tuple whose first "
        f"element is a Tensor, or an object with a .sample Tensor (diffusers' outputs)"
    )


def is_per_sample(value: Any, n: int) -> bool:
    """A keyword argument with one entry per sample: a tensor whose first dim is the batch."""
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n


def check_kwargs(model_kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` when ``model_kwargs`` sets a keyword the pipeline sets itself."""
    for name in RESERVED:
        if name in model_kwargs:
            raise TypeError(f"{name} is set by the pipeline; do not pass it in **model_kwargs")


class NetworkCall:
    r"""Call a network diffusers-style on ``(x_t, t)`` and return its raw prediction.

    .. math::

        \text{timestep} = t \cdot \text{num\_train\_timesteps}

    (rounded once to float32, or to the latents' dtype with ``timestep_dtype="latents"``), or
    ``t`` itself when ``num_train_timesteps`` is ``None``.

    Args:
        num_train_timesteps: The scale of the networks' ``timestep``; ``None`` passes ``t``.
        timestep_dtype: The scaled timestep's dtype: ``"float32"`` or ``"latents"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> call = NetworkCall(num_train_timesteps=1000)
        >>> class Echo(nn.Module):
        ...     def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        ...         return hidden_states + timestep[:, None]
        >>> call(Echo(), "teacher", torch.zeros(2, 1), torch.tensor([0.25, 0.5]), None, {})
        tensor([[250.],
                [500.]])
    """

    packs_patches: bool = False
    """Whether the call packs ``p x p`` latent patches into channels before the network sees
    them (the cache then holds ``in_channels / p**2`` channels)."""

    def __init__(
        self,
        *,
        num_train_timesteps: int | None = None,
        timestep_dtype: Literal["float32", "latents"] = "float32",
    ) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.timestep_dtype = timestep_dtype

    def timestep(self, t: Tensor, x_t: Tensor) -> Tensor:
        """The network's ``timestep`` for RF time ``t`` (``x_t`` gives the latents' dtype)."""
        if self.num_train_timesteps is None:
            return t
        dtype = torch.float32 if self.timestep_dtype == "float32" else x_t.dtype
        scale = float(self.num_train_timesteps)
        return compute_once(lambda t: t * scale, t, dtype=dtype)

    def forward(
        self,
        model: nn.Module,
        role: str,
        x_t: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> Tensor:
        """The network call itself: the prediction for ``x_t`` in its layout (unchecked)."""
        kwargs = dict(model_kwargs)
        kwargs["hidden_states"] = x_t
        kwargs["timestep"] = timestep
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        return unwrap_output(model(**kwargs), role)

    def __call__(
        self,
        model: nn.Module,
        role: str,
        x_t: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> Tensor:
        """Run ``model`` on ``(x_t, t)``: its raw prediction, checked against ``x_t``.

        Raises:
            TypeError: The network returned no tensor, or one of another dtype than ``x_t``.
            ValueError: Its prediction's shape differs from ``x_t``'s.
        """
        timestep = self.timestep(t, x_t)
        raw = self.forward(model, role, x_t, timestep, encoder_hidden_states, model_kwargs)
        check_pair(f"{role} output", raw, "hidden_states", x_t)
        return raw


def batched_teacher(
    call: NetworkCall,
    teacher: nn.Module,
    x_t: Tensor,
    t: Tensor,
    encoder_hidden_states: Tensor | None,
    negative_encoder_hidden_states: Tensor,
    kwargs: dict[str, Any],
    negative_kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor]:
    """The conditional and unconditional teacher calls as one call of batch 2B.

    Returns:
        The two raw predictions ``(cond, uncond)``, each of batch B.

    Raises:
        ValueError: The two calls' conditioning or keyword arguments cannot be stacked.
    """
    ehs, neg_ehs = encoder_hidden_states, negative_encoder_hidden_states
    what = "guidance_batching='batched' needs"
    if kwargs.keys() != negative_kwargs.keys():
        raise ValueError(
            f"{what} the same keyword arguments in both teacher calls, got "
            f"{sorted(kwargs)} and {sorted(negative_kwargs)}"
        )
    if ehs is None or ehs.shape[1:] != neg_ehs.shape[1:]:
        shape = None if ehs is None else tuple(ehs.shape)
        raise ValueError(
            f"{what} encoder_hidden_states and negative_encoder_hidden_states of one shape, "
            f"got {shape} and {tuple(neg_ehs.shape)}"
        )
    n = x_t.shape[0]
    both = {}
    for key, value in kwargs.items():
        other = negative_kwargs[key]
        if is_per_sample(value, n):
            both[key] = torch.cat([value, other])
        elif value is other:
            both[key] = value
        else:
            raise ValueError(
                f"{what} every keyword argument to be batch-shaped or shared by both calls; "
                f"{key!r} differs"
            )
    raw = call(
        teacher,
        "teacher",
        torch.cat([x_t, x_t]),
        torch.cat([t, t]),
        torch.cat([ehs, neg_ehs]),
        both,
    )
    return raw[:n], raw[n:]
