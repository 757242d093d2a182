"""The data checked before it reaches the networks: a cache's shapes against the teacher's
config (before step 1), and every batch's finiteness (on the device, read when the trainer
already reads its losses)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastgen.cache import CacheError

__all__ = ["NonFiniteDataError", "check_cache_against_config", "nonfinite_rows"]


class NonFiniteDataError(FloatingPointError):
    """A batch held NaN or inf; the message names the key, the sample and, from a latent cache,
    its shard file."""


def _pairs(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def check_cache_against_config(
    shapes: Mapping[str, tuple[int, ...]],
    config: Mapping[str, Any],
    *,
    packs_patches: bool = False,
    where: str = "data.cache",
) -> None:
    """Check a cache's per-sample shapes against a diffusers transformer's config.

    ``latents`` ``[C, ...spatial]`` need ``C == in_channels`` (``C * p * p == in_channels``
    when the call packs ``p x p`` patches into channels, as Qwen-Image's does) and spatial sizes
    divisible by ``patch_size``; packed tokens ``[L, C]`` need ``C == in_channels``. The last
    dimension of ``encoder_hidden_states`` is the text width (``joint_attention_dim``,
    ``text_dim`` or ``cross_attention_dim``), of ``pooled_projections`` the pooled width
    (``pooled_projection_dim``). Keys the config says nothing about pass.

    Args:
        shapes: Per-sample shapes (no batch dimension) by key.
        config: The transformer's config (``model.config``).
        packs_patches: The network call packs patches into channels itself.
        where: Prefix of the message (the config key of the cache).

    Raises:
        CacheError: One line naming the key, the cache's shape and the shape the config wants.

    Example:
        >>> check_cache_against_config({"latents": (7, 8, 8)}, {"in_channels": 4, "patch_size": 2})
        Traceback (most recent call last):
        ...
        fastgen.cache.CacheError: data.cache: 'latents' has per-sample shape (7, 8, 8), the teacher takes (4, 8, 8) (in_channels 4)
    """
    latents = shapes.get("latents")
    channels = config.get("in_channels")
    if latents is not None and channels is not None and len(latents) >= 2:
        latents = tuple(latents)
        patch = _pairs(config.get("patch_size") or 1)
        if len(latents) == 2:  # packed tokens [L, C]
            want = (latents[0], channels)
        else:
            spatial = latents[1:]
            if len(patch) != len(spatial):  # one size: the last two dimensions (H, W)
                patch = (1,) * (len(spatial) - 2) + (patch[0],) * 2
            c = channels // (patch[-1] * patch[-2]) if packs_patches else channels
            want = (c, *spatial)
            if any(s % p for s, p in zip(spatial, patch)):
                raise CacheError(
                    f"{where}: 'latents' has per-sample shape {latents}: the teacher's "
                    f"patch_size {patch} does not divide its sizes {spatial}"
                )
        if latents != want:
            raise CacheError(
                f"{where}: 'latents' has per-sample shape {latents}, the teacher takes "
                f"{want} (in_channels {channels})"
            )
    for key, names in (
        ("encoder_hidden_states", ("joint_attention_dim", "text_dim", "cross_attention_dim")),
        ("pooled_projections", ("pooled_projection_dim",)),
    ):
        shape = shapes.get(key)
        field = next((n for n in names if isinstance(config.get(n), int)), None)
        if shape is None or field is None or not shape:
            continue
        if shape[-1] != config[field]:
            want = (*shape[:-1], config[field])
            raise CacheError(
                f"{where}: {key!r} has per-sample shape {tuple(shape)}, the teacher takes "
                f"{want} ({field} {config[field]})"
            )


def _checked(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.ndim > 0


def checked_keys(batch: Mapping[str, Any]) -> list[str]:
    """The keys :func:`nonfinite_rows` checks, in its order (its key index counts these)."""
    return [k for k, v in batch.items() if _checked(v)]


def nonfinite_rows(batch: Mapping[str, Any], found: Tensor, call: int) -> Tensor:
    """Record the first non-finite value of ``batch`` into ``found``, on the device.

    ``found`` is ``[call, row, key index]`` of the first bad sample seen so far, ``-1``
    everywhere while there is none; the key index counts ``batch``'s batch-first
    floating-point tensors in order (:func:`checked_keys`). No host sync: the caller reads ``found`` when it reads its losses anyway.

    Args:
        batch: One batch (batch-first tensors; other values are skipped).
        found: int64 ``[3]``, on the batch's device.
        call: This batch's number (the caller's count of ``data()`` calls).

    Returns:
        The updated ``found``.

    Example:
        >>> found = torch.full((3,), -1)
        >>> found = nonfinite_rows({"a": torch.ones(3, 2)}, found, call=1)
        >>> nonfinite_rows({"a": torch.tensor([[1.0], [float("nan")]])}, found, call=2).tolist()
        [2, 1, 0]
    """
    floats = [v for v in batch.values() if _checked(v)]
    for k, value in enumerate(floats):
        bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1)
        row = bad.to(torch.int64).argmax()
        # filled on the device: a tensor made from a Python int would be a host-to-device copy
        here = torch.stack([torch.full_like(row, call), row, torch.full_like(row, k)])
        found = torch.where((found[0] < 0) & bad.any(), here, found)
    return found
