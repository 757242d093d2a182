"""Model families whose networks need more than diffusers' standard call.

- :mod:`fastgen.plugins.qwen_image`: Qwen-Image (packed 2x2 latents, its call, feature
  capture on its blocks, FastGen's image-DiT discriminator).
"""

from fastgen.plugins import qwen_image

__all__ = ["qwen_image"]
