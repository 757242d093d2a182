r"""Qwen-Image for the DMD2 step: packed latents, its call, its features, its discriminator.

diffusers' ``QwenImageTransformer2DModel`` takes latents packed in 2x2 patches,
``[B, (H/2)(W/2), 4C]``, plus ``img_shapes``, ``encoder_hidden_states_mask`` and ``guidance``,
and returns its prediction packed the same way. DMD2's math stays on the unpacked
``[B, C, H, W]`` latents: :class:`QwenImageCall` packs before every network call and unpacks
after, so the pipeline, the losses and the EMA see nothing of it.
:class:`QwenImageDMDPipeline` is :class:`~fastgen.DMDPipeline` with that call (and the
``dmd2_qwen_image`` recipe when no config is given).

Qwen-Image scales its timestep itself: ``num_train_timesteps`` must be ``None`` (``t`` in
[0, 1] goes in unchanged). ``txt_seq_lens`` (older diffusers releases) is forwarded when the
caller passes it and never derived from the mask, which would read the mask on the host.

For the GAN branch, :func:`attach_feature_capture` taps ``transformer_blocks[i]``: each block
returns ``(encoder_hidden_states, hidden_states)``; the image stream ``[B, (H/2)(W/2), D]`` is
reshaped to a grid ``[B, D, H/2, W/2]`` for :class:`ImageDiTDiscriminator`, FastGen's
image-DiT discriminator (one conv head per tapped block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.capture import FeatureCapture
from fastgen.dmd.capture import attach_feature_capture as attach_capture
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.pipeline import DMDPipeline
from fastgen.dmd.recipes import load_dmd_config

__all__ = [
    "RECIPE",
    "ImageDiTDiscriminator",
    "QwenImageCall",
    "QwenImageDMDPipeline",
    "attach_feature_capture",
    "build_img_shapes",
    "dit_group_count",
    "pack_latents",
    "unpack_latents",
]

RECIPE = "dmd2_qwen_image"
"""The built-in recipe for Qwen-Image (modelopt's ``dmd2_qwen_image``, field for field)."""

# Keywords QwenImageCall sets itself on every call.
_SET_BY_CALL = ("img_shapes", "guidance", "return_dict")


def _check_even(what: str, h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"{what} needs even latent height and width, got H={h}, W={w}")


def pack_latents(latents: Tensor) -> Tensor:
    """Pack ``[B, C, H, W]`` latents into Qwen-Image's tokens ``[B, (H/2)(W/2), 4C]``.

    Each 2x2 patch of every channel becomes one token (diffusers'
    ``QwenImagePipeline._pack_latents``); a permutation, so exact in every dtype.

    Raises:
        ValueError: ``latents`` is not 4-D, or ``H`` or ``W`` is odd.

    Example:
        >>> import torch
        >>> pack_latents(torch.zeros(2, 16, 8, 6)).shape
        torch.Size([2, 12, 64])
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    _check_even("pack_latents", h, w)
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: tokens ``[B, (H/2)(W/2), 4C]`` to ``[B, C, H, W]``.

    Raises:
        ValueError: ``packed`` is not 3-D, its last dim is not a multiple of 4, ``height`` or
            ``width`` is odd, or the token count is not ``(height/2)(width/2)``.
    """
    if packed.ndim != 3:
        raise ValueError(f"packed must be [B, tokens, 4C], got shape {tuple(packed.shape)}")
    b, tokens, c4 = packed.shape
    if c4 % 4:
        raise ValueError(f"packed's last dim must be a multiple of 4, got {c4}")
    _check_even("unpack_latents", height, width)
    h2, w2 = height // 2, width // 2
    if tokens != h2 * w2:
        raise ValueError(f"packed holds {tokens} tokens; H={height}, W={width} needs {h2 * w2}")
    x = packed.reshape(b, h2, w2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def build_img_shapes(batch_size: int, h_lat: int, w_lat: int) -> list[list[tuple[int, int, int]]]:
    """Qwen-Image's ``img_shapes``: ``[(1, h_lat/2, w_lat/2)]`` per sample (one frame).

    Example:
        >>> build_img_shapes(2, 8, 6)
        [[(1, 4, 3)], [(1, 4, 3)]]
    """
    _check_even("build_img_shapes", h_lat, w_lat)
    return [[(1, h_lat // 2, w_lat // 2)]] * batch_size


class QwenImageCall(NetworkCall):
    """Call a ``QwenImageTransformer2DModel`` on unpacked latents: pack, call, unpack.

    The network gets ``hidden_states`` packed, ``timestep`` (``t`` itself),
    ``encoder_hidden_states``, ``img_shapes``, ``guidance`` and ``return_dict=False``, plus the
    caller's keyword arguments (``encoder_hidden_states_mask`` among them); its output (a
    tensor, a tuple or ``.sample``) is unpacked to the latents' shape. ``img_shapes`` is one
    entry shared by the batch, ``[(1, H/2, W/2)]`` (every sample has the latents' size; diffusers
    reads the first entry either way), where :func:`build_img_shapes` lists one per sample: a
    per-sample list would tie a compiled graph to the batch size.

    Args:
        guidance: The transformer's guidance embedding value, for models built with
            ``guidance_embeds=True`` (a tensor ``[B]`` in the latents' dtype); ``None`` skips
            it. Independent of CFG (``DMDConfig.guidance_scale``).
    """

    packs_patches = True

    def __init__(self, *, guidance: float | None = None) -> None:
        super().__init__(num_train_timesteps=None)
        self.guidance = guidance

    def forward(
        self,
        model: nn.Module,
        role: str,
        x_t: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> Tensor:
        if x_t.ndim != 4:
            raise ValueError(
                f"Qwen-Image latents must be [B, C, H, W], got shape {tuple(x_t.shape)}"
            )
        for key in _SET_BY_CALL:
            if key in model_kwargs:
                raise TypeError(f"{key} is set by QwenImageCall; do not pass it")
        b, _, h, w = x_t.shape
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), self.guidance, device=x_t.device, dtype=x_t.dtype)
        kwargs = dict(model_kwargs)
        kwargs.update(img_shapes=[(1, h // 2, w // 2)], guidance=guidance, return_dict=False)
        packed = super().forward(
            model, role, pack_latents(x_t), timestep, encoder_hidden_states, kwargs
        )
        return unpack_latents(packed, h, w)


class QwenImageDMDPipeline(DMDPipeline):
    """:class:`~fastgen.DMDPipeline` for ``QwenImageTransformer2DModel`` networks.

    Args:
        student, teacher, fake_score: Qwen-Image transformers (or FSDP2-sharded copies).
        config: The hyperparameters; the built-in ``dmd2_qwen_image`` recipe when ``None``.
        discriminator: For the GAN branch (:class:`ImageDiTDiscriminator` on the features of
            :func:`attach_feature_capture`).
        guidance: :class:`QwenImageCall`'s guidance embedding value.

    Raises:
        ValueError: ``config.num_train_timesteps`` is set (Qwen-Image scales ``t`` itself).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        fake_score: nn.Module,
        config: DMDConfig | None = None,
        *,
        discriminator: nn.Module | None = None,
        guidance: float | None = None,
    ) -> None:
        config = load_dmd_config(RECIPE) if config is None else config
        if isinstance(config, DMDConfig) and config.num_train_timesteps is not None:
            raise ValueError(
                "Qwen-Image takes t in [0, 1] and scales it itself: num_train_timesteps must be "
                f"None, got {config.num_train_timesteps}"
            )
        super().__init__(
            student,
            teacher,
            fake_score,
            config,
            discriminator=discriminator,
            call=QwenImageCall(guidance=guidance),
        )


def attach_feature_capture(
    teacher: nn.Module,
    feature_indices: Sequence[int],
    h_lat: int,
    w_lat: int,
    *,
    blocks_attr: str = "transformer_blocks",
) -> FeatureCapture:
    """Tap Qwen-Image blocks for the discriminator: image-stream features as grids.

    Each tapped block's image stream ``[B, (h_lat/2)(w_lat/2), D]`` comes back as
    ``[B, D, h_lat/2, w_lat/2]``, in the order of the sorted, deduplicated indices.

    Args:
        teacher: The teacher transformer.
        feature_indices: Indices into ``teacher.<blocks_attr>`` (e.g. ``[30]`` of 60 blocks).
        h_lat: The latents' height (even); the grid is fixed by it.
        w_lat: The latents' width (even).
        blocks_attr: The name of the block list.

    Returns:
        The capture (:class:`~fastgen.DMDPipeline` finds it on the teacher).

    Raises:
        ValueError: Odd latent dims, an empty or out-of-range index list, or latents of another
            size at call time.
    """
    _check_even("attach_feature_capture", h_lat, w_lat)
    blocks = getattr(teacher, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"the teacher has no ModuleList {blocks_attr!r} to tap")
    indices = sorted(set(int(i) for i in feature_indices))
    if not indices or not all(0 <= i < len(blocks) for i in indices):
        raise ValueError(
            f"feature_indices must be indices into {len(blocks)} blocks, got {feature_indices!r}"
        )
    h2, w2 = h_lat // 2, w_lat // 2

    def grid(tokens: Tensor) -> Tensor:
        if tokens.ndim != 3 or tokens.shape[1] != h2 * w2:
            raise ValueError(
                f"the capture expects {h2 * w2} image tokens (latents {h_lat}x{w_lat}), got "
                f"shape {tuple(tokens.shape)}: attach the capture again for this size"
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h2, w2)

    return attach_capture(teacher, taps=indices, blocks=blocks_attr, output_index=1, transform=grid)


def dit_group_count(channels: int) -> int:
    """FastGen's GroupNorm group count for the image-DiT heads: ``channels // 4`` (at least 1)
    up to 32 channels, else the largest divisor of ``channels`` not above 32.

    Example:
        >>> dit_group_count(8), dit_group_count(48), dit_group_count(1536)
        (2, 24, 32)
    """
    if channels <= 32:
        return max(1, channels // 4)
    return next(g for g in range(32, 0, -1) if channels % g == 0)


class ImageDiTDiscriminator(nn.Module):
    """FastGen's image-DiT discriminator: logits ``[B, num_heads]`` from grid features.

    One head per tapped block: a 4x4 stride-2 conv to ``inner_dim // 2`` channels, GroupNorm
    (:func:`dit_group_count`), LeakyReLU(0.2), a 1x1 conv to one channel, averaged over the
    grid. The weights' names (``cls_pred_heads``) are FastGen's and modelopt's, so their
    checkpoints load.

    Args:
        inner_dim: Channels of each feature (the transformer's width, 3072 for Qwen-Image).
        num_heads: The number of tapped blocks.

    Example:
        >>> import torch
        >>> disc = ImageDiTDiscriminator(inner_dim=16, num_heads=2)
        >>> disc([torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)]).shape
        torch.Size([3, 2])
    """

    def __init__(self, inner_dim: int, num_heads: int = 1) -> None:
        super().__init__()
        if inner_dim < 2 or num_heads < 1:
            raise ValueError(
                f"inner_dim must be >= 2 and num_heads >= 1, got {inner_dim}, {num_heads}"
            )
        hidden = inner_dim // 2
        self.inner_dim = inner_dim
        self.cls_pred_heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(inner_dim, hidden, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(dit_group_count(hidden), hidden),
                nn.LeakyReLU(0.2),
                nn.Conv2d(hidden, 1, kernel_size=1),
                nn.AdaptiveAvgPool2d((1, 1)),
                nn.Flatten(),
            )
            for _ in range(num_heads)
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.cls_pred_heads):
            raise ValueError(f"got {len(features)} features for {len(self.cls_pred_heads)} heads")
        logits = []
        for head, f in zip(self.cls_pred_heads, features):
            if f.ndim != 4 or f.shape[1] != self.inner_dim:
                raise ValueError(
                    f"features must be [B, {self.inner_dim}, h, w], got shape {tuple(f.shape)}"
                )
            # Features arrive in the teacher's dtype; the head computes in its own.
            logits.append(head(f.to(head[0].weight.dtype)))
        return torch.cat(logits, dim=1)
