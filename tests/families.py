"""Tiny diffusers transformers of three families (SD3, Flux, Wan), saved with save_pretrained, and
latent caches for them: what a user's model folder and cache look like, built in seconds."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from fastgen.cache import write_shard

SD3 = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
    caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=16,
)  # fmt: skip
FLUX = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12,
    guidance_embeds=False, axes_dims_rope=(2, 2, 4),
)  # fmt: skip
WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
    out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
    rope_max_seq_len=32,
)  # fmt: skip

QWEN = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
)  # fmt: skip

RECIPES = {"sd3": "dmd2_sd3", "flux": "dmd2_flux", "wan": "dmd2_wan21", "qwen": "dmd2_qwen_image"}


def build(family: str, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(**SD3)
    if family == "flux":
        return diffusers.FluxTransformer2DModel(**FLUX)
    if family == "qwen":
        return diffusers.QwenImageTransformer2DModel(**QWEN)
    return diffusers.WanTransformer3DModel(**WAN)


def save_teacher(family: str, root: Path) -> Path:
    """A pipeline-style folder ``root/teacher`` with the network in ``transformer/``."""
    folder = Path(root) / "teacher"
    build(family).save_pretrained(str(folder / "transformer"))
    return folder


def samples(family: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` samples of a cache for ``family``: latents, conditioning, negatives."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if family == "sd3":
        return {
            "latents": randn(n, 4, 8, 8),
            "encoder_hidden_states": randn(n, 5, 16),
            "pooled_projections": randn(n, 12),
            "negative_encoder_hidden_states": torch.zeros(1, 5, 16),
            "negative_pooled_projections": torch.zeros(1, 12),
        }
    if family == "flux":  # packed 4x4 tokens of 16 channels, rotary ids per sample
        grid = torch.stack(
            [torch.zeros(16), torch.arange(4.0).repeat_interleave(4), torch.arange(4.0).repeat(4)],
            1,
        )
        return {
            "latents": randn(n, 16, 16),
            "encoder_hidden_states": randn(n, 5, 16),
            "pooled_projections": randn(n, 12),
            "img_ids": grid.expand(n, 16, 3).clone(),
            "txt_ids": torch.zeros(n, 5, 3),
        }
    if family == "qwen":  # unpacked latents; the plugin packs them
        mask = torch.ones(n, 5, dtype=torch.long)
        mask[:, 4:] = 0
        return {
            "latents": randn(n, 4, 8, 6),
            "encoder_hidden_states": randn(n, 5, 12),
            "encoder_hidden_states_mask": mask,
        }
    return {
        "latents": randn(n, 4, 2, 8, 8),  # video: 2 frames
        "encoder_hidden_states": randn(n, 5, 16),
        "negative_encoder_hidden_states": torch.zeros(1, 5, 16),
    }


def write_cache(family: str, root: Path, shards: int = 2, per_shard: int = 4) -> Path:
    folder = Path(root) / "cache"
    for i in range(shards):
        write_shard(folder / f"shard_{i:03d}", samples(family, per_shard, seed=i))
    return folder


def run_yaml(tmp_path, family, **extra) -> str:
    teacher = save_teacher(family, tmp_path)
    cache = write_cache(family, tmp_path)
    run = {
        "out": str(tmp_path / "run"),
        "steps": 2,
        "recipe": RECIPES[family],
        "teacher": {"path": str(teacher), "subfolder": "transformer"},
        "data": {"cache": str(cache), "batch_size": 2},
        "dmd": {"student_update_freq": 1, "ema": {"decay": 0.5}},
        "checkpoint": {"every": 1},
        "log": {"progress": False, "tensorboard": False},
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer over single letters, written to ``folder`` (no download)."""
    import json

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def save_sd3_pipeline(root: Path) -> Path:
    """A whole tiny StableDiffusion3Pipeline folder: two CLIP text encoders and tokenizers (no
    T5), a VAE, the transformer and the scheduler, saved with save_pretrained."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    root = Path(root)
    text = CLIPTextConfig(vocab_size=54, hidden_size=8, intermediate_size=16, projection_dim=8,
                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16, shift_factor=0.1, scaling_factor=1.5,
    )  # fmt: skip
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=diffusers.SD3Transformer2DModel(**dict(SD3, pooled_projection_dim=16)),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(text),
        tokenizer=clip_tokenizer(root / "tok"),
        text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer_2=clip_tokenizer(root / "tok"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    folder = root / "sd3-pipeline"
    pipe.save_pretrained(str(folder))
    return folder


def image_folder(root: Path, n: int = 5, size: int = 16) -> Path:
    """``n`` random RGB images and a ``metadata.jsonl`` of captions (the imagefolder layout)."""
    import json

    from PIL import Image

    folder = Path(root) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        pixels = torch.randint(0, 256, (size + 4 * i, size, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"img_{i}.png")
        lines.append(json.dumps({"file_name": f"img_{i}.png", "text": f"a picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def t5_tokenizer(folder: Path):
    """A T5 tokenizer (unigram over letters) written to ``folder`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("a"), ord("z") + 1)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>",
                           eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=512)  # fmt: skip


def save_wan_pipeline(root: Path) -> Path:
    """A whole tiny WanPipeline folder: a UMT5 text encoder, a T5 tokenizer, Wan's video VAE,
    the transformer and the scheduler."""
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    root = Path(root)
    text = UMT5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8)  # fmt: skip
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.1] * 4,
                                     latents_std=[2.0] * 4)  # fmt: skip
    pipe = diffusers.WanPipeline(
        tokenizer=t5_tokenizer(root / "t5"), text_encoder=UMT5EncoderModel(text), vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=build("wan"),
    )  # fmt: skip
    folder = root / "wan-pipeline"
    pipe.save_pretrained(str(folder))
    return folder


def save_flux_pipeline(root: Path) -> Path:
    """A whole tiny FluxPipeline folder: CLIP and T5 text encoders and tokenizers, a VAE, the
    transformer (packed 2x2 patches of 4 latent channels) and the scheduler."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    root = Path(root)
    clip = CLIPTextConfig(vocab_size=54, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)  # fmt: skip
    t5 = T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8)  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16, shift_factor=0.1, scaling_factor=1.5,
    )  # fmt: skip
    transformer = diffusers.FluxTransformer2DModel(**dict(FLUX, pooled_projection_dim=8))
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModel(clip), tokenizer=clip_tokenizer(root / "clip"),
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=t5_tokenizer(root / "t5"),
        transformer=transformer,
    )  # fmt: skip
    folder = root / "flux-pipeline"
    pipe.save_pretrained(str(folder))
    return folder
