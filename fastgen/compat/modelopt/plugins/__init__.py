"""``modelopt.torch.fastgen.plugins``: the model families (Qwen-Image)."""

from fastgen.compat.modelopt.plugins import qwen_image
from fastgen.compat.modelopt.plugins.qwen_image import (
    QwenImageDMDPipeline,
    attach_feature_capture,
    build_img_shapes,
    pack_latents,
    remove_feature_capture,
    unpack_latents,
)

__all__ = [
    "QwenImageDMDPipeline",
    "attach_feature_capture",
    "build_img_shapes",
    "pack_latents",
    "qwen_image",
    "remove_feature_capture",
    "unpack_latents",
]
