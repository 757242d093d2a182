r"""Feature networks from local files, each identified by its SHA-256: never fetched.

- **FID features**: a TorchScript file whose ``forward`` takes RGB images as ``uint8``
  ``[N, 3, H, W]`` (0..255) and returns features ``[N, D]``. NVIDIA's
  ``inception-2015-12-05.pt`` (the TorchScript Inception of StyleGAN2-ADA's metrics, the
  network of the original TensorFlow FID) is such a file; its ``return_features=True`` is
  passed when ``forward`` takes it, for the 2048-d pool features.
- **CLIP**: a transformers CLIP folder (``CLIPModel`` with its tokenizer, and optionally a
  ``preprocessor_config.json`` for the image size, mean and std), loaded with
  ``from_pretrained`` from disk.

The CLIP score follows Hessel et al. (2021) as torchmetrics reports it:
:math:`100 \cdot \max(\cos(E_I, E_T), 0)`; the raw cosine is reported beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClipScorer", "FeatureNet", "sha256"]

# OpenAI CLIP's image normalisation (used when the folder has no preprocessor_config.json).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file, or of a folder's files (names and bytes, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _check(path: str | Path, what: str, expected: str | None) -> tuple[Path, str]:
    path = Path(path)
    if not path.exists():
        hint = f" (expected sha256 {expected})" if expected else ""
        raise FileNotFoundError(f"{what}: no file {str(path)!r}{hint}")
    digest = sha256(path)
    if expected is not None and digest != expected.lower():
        raise ValueError(f"{what}: {path} has sha256 {digest}, expected {expected}")
    return path, digest


def to_uint8(images: Tensor) -> Tensor:
    """RGB pictures in [0, 1] to ``uint8`` 0..255 (rounded), as image files hold them."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class FeatureNet:
    """A TorchScript feature network from a local file (FID's Inception, or any other).

    Args:
        path: The TorchScript file.
        sha256: When given, the file must have this SHA-256.
    """

    def __init__(self, path: str | Path, *, sha256: str | None = None) -> None:
        self.path, self.sha256 = _check(path, "--fid-weights", sha256)
        try:
            self.net = torch.jit.load(str(self.path), map_location="cpu").eval()
        except RuntimeError as err:
            raise ValueError(
                f"--fid-weights: {self.path} is not a TorchScript file ({err})"
            ) from None
        arguments = [a.name for a in self.net.forward.schema.arguments]
        self._kwargs = {"return_features": True} if "return_features" in arguments else {}

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256,
                "input": "uint8 RGB [N, 3, H, W], 0..255", **self._kwargs}  # fmt: skip

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Features ``[N, D]`` (float64) of pictures ``[N, 3, H, W]`` in [0, 1]."""
        pixels = to_uint8(images)
        parts = [
            self.net(pixels[i : i + batch_size], **self._kwargs)
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(parts).double().flatten(1)


class ClipScorer:
    """CLIP image and text embeddings from a local transformers folder, and the CLIP score.

    Args:
        path: A folder saved with ``CLIPModel.save_pretrained`` and the tokenizer's
            ``save_pretrained``.
        sha256: When given, the folder's files must hash to this (see :func:`sha256`).
    """

    def __init__(self, path: str | Path, *, sha256: str | None = None) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.path, self.sha256 = _check(path, "--clip", sha256)
        try:
            self.model = CLIPModel.from_pretrained(str(self.path)).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError) as err:
            raise ValueError(f"--clip: {self.path} is not a CLIP folder ({err})") from None
        pre = self.path / "preprocessor_config.json"
        config = json.loads(pre.read_text()) if pre.is_file() else {}
        self.size = int(self.model.config.vision_config.image_size)
        self.mean = torch.tensor(config.get("image_mean", _CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(config.get("image_std", _CLIP_STD)).view(1, 3, 1, 1)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256,
                "clip_score": "100 * max(cos(image, text), 0)", "image_size": self.size}  # fmt: skip

    def _pixels(self, images: Tensor) -> Tensor:
        # CLIP's preprocessing in torch: shorter side to image_size (bicubic), centre crop.
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        size = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        x = F.interpolate(
            images.float(), size=size, mode="bicubic", antialias=True, align_corners=False
        )
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[N, D]`` (float64) of pictures in [0, 1]."""
        out = self.model.get_image_features(pixel_values=self._pixels(images))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.double(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> Tensor:
        """Unit-norm text embeddings ``[N, D]`` (float64)."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(**tokens)
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.double(), dim=-1)

    def scores(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Per pair: ``(clip_score, cosine)``, with clip_score = 100 * max(cosine, 0)."""
        cos = (self.image_embeds(images) * self.text_embeds(texts)).sum(-1)
        return 100 * cos.clamp_min(0), cos
