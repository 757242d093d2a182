"""fastgen.train.decode: the pipeline's own last lines, replayed: bitwise equal pictures."""

from __future__ import annotations

import pytest
import torch
from families import save_flux_pipeline, save_sd3_pipeline, save_wan_pipeline

from fastgen.train.decode import decode, pixel_size
from fastgen.train.evaluate import load_pipeline

SAVERS = {"sd3": save_sd3_pipeline, "flux": save_flux_pipeline, "wan": save_wan_pipeline}


def _pipeline_decode(pipe, latents, height, width):
    """What the pipeline's ``__call__`` does after its loop (diffusers 0.42)."""
    name = type(pipe).__name__
    vae = pipe.vae
    if name == "WanPipeline":
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
        video = vae.decode(latents / std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt")[:, 0]
    if name == "FluxPipeline":
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")


@pytest.mark.parametrize("family", sorted(SAVERS))
def test_decode_equals_the_pipelines_own_decoding(tmp_path, family):
    pipe = load_pipeline(SAVERS[family](tmp_path))
    g = torch.Generator().manual_seed(0)
    shape = {"sd3": (2, 4, 8, 8), "flux": (2, 16, 16), "wan": (2, 4, 1, 8, 8)}[family]
    latents = torch.randn(shape, generator=g)
    height, width = pixel_size(latents, pipe)
    with torch.no_grad():
        expected = _pipeline_decode(pipe, latents, height, width)
    got = decode(pipe, latents)
    assert got.shape == expected.shape and got.shape[:2] == (2, 3)
    if family != "wan":  # the tiny Wan VAE upsamples 2x, not its config's scale_factor_spatial 8
        assert got.shape[-2:] == (height, width)
    assert got.dtype == torch.float32 and 0.0 <= got.min() and got.max() <= 1.0
    assert torch.equal(got, expected.float())


def test_packed_latents_must_be_square_without_a_size(tmp_path):
    pipe = load_pipeline(save_flux_pipeline(tmp_path))
    with pytest.raises(ValueError, match="not a square grid"):
        decode(pipe, torch.zeros(1, 12, 16))
