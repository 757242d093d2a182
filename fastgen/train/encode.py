"""``fastgen cache``: images and captions (or prompts) into a latent cache, with a diffusers
pipeline folder's own VAE and text encoders.

Images come as an image folder with ``metadata.jsonl`` (one ``{"file_name", "text"}`` per line,
the Hugging Face imagefolder layout); each is center-cropped to a square, resized to
``resolution`` and encoded by the VAE (``(z - shift_factor) * scaling_factor``; Wan's
per-channel mean and std). Prompts come as a text file, one per line: a data-free cache whose
``latents`` are placeholders (zeros, marked in the shard's metadata), for 1-step or
backward-simulation students without the GAN branch. The conditioning is the pipeline's own
``encode_prompt``; the negative prompt's is stored once (batch 1). Supported pipelines:
``StableDiffusion3Pipeline``, ``FluxPipeline``, ``WanPipeline``.

Shards hold ``shard_size`` samples each and are written whole (to a temporary name, then
renamed): rerunning the same command skips the shards already there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastgen.cache import PLACEHOLDER_KEY, write_shard
from fastgen.plugins.qwen_image import pack_latents  # Flux packs 2x2 patches as Qwen-Image does

__all__ = [
    "PLACEHOLDER",
    "SUPPORTED",
    "PipelineFamily",
    "encode_cache",
    "load_pipeline",
    "read_images",
    "read_pixels",
]

SUPPORTED = ("StableDiffusion3Pipeline", "FluxPipeline", "WanPipeline")
PLACEHOLDER = {PLACEHOLDER_KEY: "placeholder"}
"""The metadata of a shard whose ``latents`` are zeros (a prompts-only cache)."""


def load_pipeline(path: str | Path) -> Any:
    """The pipeline folder's components that encode (the transformer only where the prompt
    encoding reads its config: SD3 without T5).

    Raises:
        FileNotFoundError: No ``model_index.json`` in ``path``.
        ValueError: A pipeline class ``fastgen cache`` does not know.
    """
    import diffusers

    index = _index(path)
    name = index["_class_name"]
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    if not (name == "StableDiffusion3Pipeline" and "text_encoder_3" in absent):
        absent["transformer"] = None  # not needed to encode
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _index(path: str | Path) -> dict[str, Any]:
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"--pipeline: no model_index.json in {str(path)!r}")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    if index.get("_class_name") not in SUPPORTED:
        raise ValueError(f"--pipeline: {index.get('_class_name')!r} is not one of {SUPPORTED}")
    return index


def read_images(folder: str | Path, captions: str | Path | None = None) -> list[tuple[Path, str]]:
    """``(image file, caption)`` pairs from an image folder's ``metadata.jsonl``.

    Raises:
        FileNotFoundError: No metadata file, or a listed image that is not there.
        ValueError: A line that is not ``{"file_name": ..., "text": ...}``.
    """
    folder = Path(folder)
    meta = Path(captions) if captions is not None else folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"--images: no captions file {str(meta)!r} (metadata.jsonl)")
    pairs = []
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f'{meta}:{number}: expected {{"file_name": ..., "text": ...}}'
            ) from None
        image = folder / name
        if not image.is_file():
            raise FileNotFoundError(f"{meta}:{number}: no image {str(image)!r}")
        pairs.append((image, str(text)))
    if not pairs:
        raise ValueError(f"{meta}: no captions")
    return pairs


def read_pixels(path: Path, resolution: int) -> Tensor:
    """An image center-cropped to a square, resized, as ``[3, R, R]`` in [-1, 1]."""
    import numpy as np
    from PIL import Image

    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize(
        (resolution, resolution), Image.Resampling.BICUBIC
    )
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1.0


class PipelineFamily:
    """How one pipeline class turns pixels and prompts into cache tensors."""

    def __init__(self, pipe: Any, seed: int) -> None:
        self.pipe, self.name = pipe, type(pipe).__name__
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def latents(self, pixels: Tensor) -> dict[str, Tensor]:
        vae = self.pipe.vae
        pixels = pixels.to(vae.dtype)
        if self.name == "WanPipeline":
            z = vae.encode(pixels[:, :, None]).latent_dist.sample(self.generator)  # one frame
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            return {"latents": (z - mean) / std}
        z = vae.encode(pixels).latent_dist.sample(self.generator)
        z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        if self.name != "FluxPipeline":
            return {"latents": z}
        b, _, h, w = z.shape
        rows = torch.arange(h // 2, dtype=torch.float32).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, dtype=torch.float32).repeat(h // 2)
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
        return {"latents": pack_latents(z), "img_ids": ids.expand(b, *ids.shape).clone()}

    def placeholder(self, n: int, resolution: int) -> dict[str, Tensor]:
        """Zeros of the latents' shape (what the VAE would give at ``resolution``)."""
        probe = self.latents(torch.zeros(1, 3, resolution, resolution))
        probe["latents"] = torch.zeros_like(probe["latents"])
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in probe.items()}

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> dict[str, Tensor]:
        pipe = self.pipe
        if self.name == "StableDiffusion3Pipeline":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.name == "FluxPipeline":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None)
            n = len(prompts)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled,
                    "txt_ids": text_ids.expand(n, *text_ids.shape).clone()}  # fmt: skip
        embeds, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def negative(self, prompt: str) -> dict[str, Tensor]:
        if self.name == "FluxPipeline":  # Flux is guidance-distilled: no unconditional call
            return {}
        cond = self.conditioning([prompt])
        return {f"negative_{k}": v for k, v in cond.items()}


def _chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start // size, items[start : start + size]


def encode_cache(
    pipeline: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    prompts: str | Path | None = None,
    resolution: int = 512,
    negative_prompt: str = "",
    shard_size: int = 256,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, int]:
    """Encode images with captions (or prompts alone) into a latent cache at ``out``.

    Returns:
        ``{"samples", "shards", "skipped"}``: the samples, the shards written now, and the
        shards that were already there.

    Raises:
        FileNotFoundError: A missing pipeline folder, image folder, captions or prompts file.
        ValueError: Neither or both of ``images`` and ``prompts``; an unknown pipeline class.
    """
    if (images is None) == (prompts is None):
        raise ValueError("give --images (with captions) or --prompts, one of the two")
    _index(pipeline)
    if prompts is not None:
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts: no file {str(path)!r}")
        items = [(None, line.strip()) for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip()]  # fmt: skip
        if not items:
            raise ValueError(f"--prompts: {path} holds no prompt")
    else:
        items = read_images(images, captions)
    family = PipelineFamily(load_pipeline(pipeline), seed)
    negative = family.negative(negative_prompt)
    out = Path(out)
    written = skipped = 0
    for index, shard in _chunks(items, shard_size):
        target = out / f"shard_{index:05d}.safetensors"
        if target.is_file():
            skipped += 1
            continue
        parts: dict[str, list[Tensor]] = {}
        for _, chunk in _chunks(shard, batch_size):
            texts = [text for _, text in chunk]
            if chunk[0][0] is None:
                tensors = family.placeholder(len(chunk), resolution)
            else:
                pixels = torch.stack([read_pixels(file, resolution) for file, _ in chunk])
                tensors = family.latents(pixels)
            tensors.update(family.conditioning(texts))
            for key, value in tensors.items():
                parts.setdefault(key, []).append(value.float().cpu())
        tensors = {k: torch.cat(v) for k, v in parts.items()} | negative
        write_shard(target, tensors, metadata=PLACEHOLDER if prompts is not None else None)
        written += 1
    return {"samples": len(items), "shards": written, "skipped": skipped}
