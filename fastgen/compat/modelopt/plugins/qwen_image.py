"""``modelopt.torch.fastgen.plugins.qwen_image`` over :mod:`fastgen.plugins.qwen_image`."""

from __future__ import annotations

from torch import nn

from fastgen.compat.modelopt.methods.dmd import DMDPipeline
from fastgen.dmd.capture import remove_feature_capture as remove_capture
from fastgen.dmd.config import DMDConfig
from fastgen.plugins import qwen_image as _qwen
from fastgen.plugins.qwen_image import build_img_shapes, pack_latents, unpack_latents

__all__ = [
    "QwenImageDMDPipeline",
    "attach_feature_capture",
    "build_img_shapes",
    "pack_latents",
    "remove_feature_capture",
    "unpack_latents",
]


class QwenImageDMDPipeline(DMDPipeline):
    """The DMD2 pipeline on Qwen-Image's packed transformer (:class:`QwenImageCall`).

    Args:
        guidance: The transformer's guidance embedding value (``guidance_embeds=True`` models).

    Raises:
        ValueError: ``config.num_train_timesteps`` is set.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        fake_score: nn.Module,
        config: DMDConfig,
        *,
        discriminator: nn.Module | None = None,
        guidance: float | None = None,
    ) -> None:
        if config.num_train_timesteps is not None:
            raise ValueError(
                "QwenImageDMDPipeline requires DMDConfig.num_train_timesteps=None: Qwen-Image "
                f"scales t in [0, 1] itself (got num_train_timesteps={config.num_train_timesteps})"
            )
        super().__init__(
            student,
            teacher,
            fake_score,
            config,
            discriminator=discriminator,
            call=_qwen.QwenImageCall(guidance=guidance),
        )


def attach_feature_capture(
    teacher: nn.Module,
    feature_indices: list[int],
    h_lat: int,
    w_lat: int,
    *,
    blocks_attr: str = "transformer_blocks",
) -> None:
    """Tap ``teacher.<blocks_attr>[i]`` (:func:`fastgen.plugins.qwen_image.attach_feature_capture`).

    Raises:
        AttributeError: ``teacher`` has no ``blocks_attr``.
        IndexError: An index is out of range.
        ValueError: ``h_lat`` or ``w_lat`` is odd.
    """
    blocks = getattr(teacher, blocks_attr, None)
    if blocks is None:
        raise AttributeError(f"teacher {type(teacher).__name__!r} has no {blocks_attr!r}")
    for i in feature_indices:
        if not 0 <= i < len(blocks):
            raise IndexError(f"feature_indices entry {i} is out of range for {len(blocks)} blocks")
    _qwen.attach_feature_capture(teacher, feature_indices, h_lat, w_lat, blocks_attr=blocks_attr)


def remove_feature_capture(teacher: nn.Module) -> None:
    """Remove the capture's hooks (a no-op when there is none)."""
    remove_capture(teacher)
