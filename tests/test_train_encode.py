"""``fastgen cache`` on tiny StableDiffusion3, Flux and Wan pipelines built and saved locally (CLIP
and T5 tokenizers made here, no downloads): images and captions through each pipeline's own VAE
and text encoders into the cache format, resumable by shard; a prompts-only cache; then the
three commands on each."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from families import image_folder, save_flux_pipeline, save_sd3_pipeline, save_wan_pipeline

from fastgen.cache import LatentCache
from fastgen.cli import main

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


# the module fixture built once: the file's tests on one xdist worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("train_encode")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return save_sd3_pipeline(tmp_path_factory.mktemp("pipe"))


def test_images_and_captions_are_the_pipelines_own_encodings(tmp_path, pipeline_folder, capsys):
    images = image_folder(tmp_path, n=5)
    out = tmp_path / "cache"
    args = ["cache", "--pipeline", str(pipeline_folder), "--images", str(images), "--out",
            str(out), "--resolution", "16", "--shard-size", "2", "--batch-size", "2"]  # fmt: skip
    assert main(args) == 0
    assert "5 samples" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"shard_0000{i}.safetensors" for i in range(3)]
    cache = LatentCache(out, batch_size=5, shuffle=False)
    assert not cache.placeholder_latents
    batch = cache()
    assert batch["latents"].shape == (5, 4, 8, 8)
    # the same encodings by hand, with the pipeline the user would load
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        str(pipeline_folder), text_encoder_3=None, tokenizer_3=None
    )
    captions = [
        json.loads(line)["text"] for line in (images / "metadata.jsonl").read_text().splitlines()
    ]
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=captions, prompt_2=None, prompt_3=None, negative_prompt=[""] * 5
    )
    torch.testing.assert_close(batch["encoder_hidden_states"], embeds)
    torch.testing.assert_close(batch["pooled_projections"], pooled)
    torch.testing.assert_close(batch["negative_encoder_hidden_states"], neg)
    torch.testing.assert_close(batch["negative_pooled_projections"], neg_pooled)
    from fastgen.train.encode import read_pixels

    vae = pipe.vae
    pixels = torch.stack([read_pixels(images / f"img_{i}.png", 16) for i in range(5)])
    mean = vae.encode(pixels).latent_dist.mean
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    std = (vae.encode(pixels).latent_dist.std * vae.config.scaling_factor).max()
    assert (batch["latents"] - expected).abs().max() < 6 * std  # a sample of that distribution
    # rerun: every shard is there already
    (out / "shard_00001.safetensors").unlink()
    assert main(args) == 0
    assert "1 shards written, 2 already there" in capsys.readouterr().out


def test_cache_distill_sample_on_the_pipeline_folder(tmp_path, pipeline_folder, capsys):
    images = image_folder(tmp_path, n=4)
    cache = tmp_path / "cache"
    assert main(["cache", "--pipeline", str(pipeline_folder), "--images", str(images),
                 "--out", str(cache), "--resolution", "16"]) == 0  # fmt: skip
    run = {
        "out": str(tmp_path / "run"), "steps": 1, "recipe": "dmd2_sd3",
        "teacher": {"path": str(pipeline_folder), "subfolder": "transformer"},
        "data": {"cache": str(cache), "batch_size": 2},
        "dmd": {"student_update_freq": 1}, "log": {"progress": False, "tensorboard": False},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["distill", str(tmp_path / "run.yaml")]) == 0
    export = tmp_path / "run" / "export" / "transformer"
    assert main(["sample", "--student", str(export), "--cache", str(cache), "--out",
                 str(tmp_path / "grid"), "--samples", "2"]) == 0  # fmt: skip
    assert (tmp_path / "grid.png").is_file()
    # the exported pipeline folder samples as fastgen.sample does, through diffusers' own loop
    import fastgen
    from fastgen.train.folders import read_export

    settings = read_export(export)
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        str(tmp_path / "run" / "export" / "pipeline"), text_encoder_3=None, tokenizer_3=None
    )
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    batch = LatentCache(cache, batch_size=2, shuffle=False)()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ladder = settings["t_list"]
    theirs = pipe(
        prompt_embeds=batch["encoder_hidden_states"],
        pooled_prompt_embeds=batch["pooled_projections"],
        latents=noise * ladder[0], num_inference_steps=len(ladder) - 1, sigmas=ladder[:-1],
        guidance_scale=1.0, output_type="latent",
    ).images  # fmt: skip
    ours = fastgen.sample(
        pipe.transformer, noise, ladder, num_train_timesteps=settings["num_train_timesteps"],
        encoder_hidden_states=batch["encoder_hidden_states"],
        pooled_projections=batch["pooled_projections"],
    )  # fmt: skip
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_a_prompts_only_cache_has_placeholder_latents(tmp_path, pipeline_folder, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue ball\na cat\n")
    out = tmp_path / "cache"
    assert main(["cache", "--pipeline", str(pipeline_folder), "--prompts", str(prompts),
                 "--out", str(out), "--resolution", "16"]) == 0  # fmt: skip
    cache = LatentCache(out, batch_size=3, shuffle=False)
    batch = cache()
    assert cache.placeholder_latents and batch["latents"].shape == (3, 4, 8, 8)
    assert not batch["latents"].any() and batch["encoder_hidden_states"].any()
    run = {
        "out": str(tmp_path / "run"), "steps": 1, "recipe": "dmd2_sd3",
        "teacher": {"path": str(pipeline_folder), "subfolder": "transformer"},
        "data": {"cache": str(out), "batch_size": 1},
        "dmd": {"student_update_freq": 1}, "log": {"progress": False, "tensorboard": False},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    capsys.readouterr()
    assert main(["distill", str(tmp_path / "run.yaml")]) == 2  # the recipe's GAN reads latents
    assert "placeholder latents" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "run.yaml"), "--set", "dmd.gan_loss_weight_gen=0"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "IMAGES", "--prompts", "P"], "one of the two"),
        (["--prompts", "/no/such/prompts.txt"], "--prompts: no file"),
        (["--images", "/no/such/folder"], "--images: no captions file"),
    ],
)
def test_bad_cache_arguments_are_one_line(tmp_path, pipeline_folder, capsys, args, message):
    args = [a.replace("IMAGES", str(tmp_path)) for a in args]
    assert (
        main(["cache", "--pipeline", str(pipeline_folder), "--out", str(tmp_path / "c"), *args])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_folder_that_is_no_pipeline(tmp_path, capsys):
    assert main(["cache", "--pipeline", str(tmp_path), "--prompts", "x", "--out", "y"]) == 2
    assert "no model_index.json" in capsys.readouterr().err


PIPELINES = {"wan": save_wan_pipeline, "flux": save_flux_pipeline}
RECIPE = {"wan": "dmd2_wan21", "flux": "dmd2_flux"}


def own_encoding(family, pipe, captions):
    """The conditioning as the pipeline's own encode_prompt gives it."""
    if family == "wan":
        embeds, neg = pipe.encode_prompt(prompt=captions, negative_prompt=[""] * len(captions))
        return {"encoder_hidden_states": embeds, "negative_encoder_hidden_states": neg}
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=captions, prompt_2=None)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled,
            "txt_ids": text_ids.expand(len(captions), *text_ids.shape)}  # fmt: skip


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_wan_and_flux_caches_then_distill_and_sample(tmp_path, family, capsys):
    folder = PIPELINES[family](tmp_path)
    images = image_folder(tmp_path, n=4)
    cache = tmp_path / "cache"
    assert main(["cache", "--pipeline", str(folder), "--images", str(images), "--out", str(cache),
                 "--resolution", "16"]) == 0  # fmt: skip
    batch = LatentCache(cache, batch_size=4, shuffle=False)()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    captions = [
        json.loads(line)["text"] for line in (images / "metadata.jsonl").read_text().splitlines()
    ]
    with torch.no_grad():  # as fastgen cache encodes (attention kernels differ under grad)
        own = own_encoding(family, pipe, captions)
    for key, value in own.items():
        torch.testing.assert_close(batch[key], value, msg=key)
    latents = batch["latents"]
    assert latents.shape == ((4, 4, 1, 8, 8) if family == "wan" else (4, 16, 16))  # Flux: packed
    if family == "flux":
        assert batch["img_ids"].shape == (4, 16, 3)
        assert batch["img_ids"][0, 5].tolist() == [0.0, 1.0, 1.0]  # token 5 of a 4x4 grid
    run = {
        "out": str(tmp_path / "run"), "steps": 1, "recipe": RECIPE[family],
        "teacher": {"path": str(folder), "subfolder": "transformer"},
        "data": {"cache": str(cache), "batch_size": 2},
        "dmd": {"student_update_freq": 1}, "log": {"progress": False, "tensorboard": False},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["distill", str(tmp_path / "run.yaml")]) == 0
    export = tmp_path / "run" / "export"
    assert main(["sample", "--student", str(export / "transformer"), "--cache", str(cache),
                 "--out", str(tmp_path / "grid"), "--samples", "2"]) == 0  # fmt: skip
    assert torch.isfinite(torch.load(tmp_path / "grid.pt")["samples"]).all()
    loaded = diffusers.DiffusionPipeline.from_pretrained(str(export / "pipeline"))
    assert loaded.scheduler.config.shift == 1.0
