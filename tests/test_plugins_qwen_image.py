"""fastgen.plugins.qwen_image on a tiny diffusers QwenImageTransformer2DModel built from a config:
packing against diffusers' own pipeline, the call adapter, one full DMD2 iteration, each loss in
one compiled frame, and parity with modelopt's Qwen-Image plugin."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from parity import close, pinned
from torch import nn
from torch._dynamo.testing import CompileCounter

from fastgen import DMDConfig, load_dmd_config
from fastgen.plugins.qwen_image import (
    RECIPE,
    ImageDiTDiscriminator,
    QwenImageCall,
    QwenImageDMDPipeline,
    attach_feature_capture,
    build_img_shapes,
    dit_group_count,
    pack_latents,
    unpack_latents,
)

diffusers = pytest.importorskip("diffusers")

C, H, W, B = 4, 8, 6, 3
CONFIG = dict(
    patch_size=2,
    in_channels=4 * C,
    out_channels=C,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    axes_dims_rope=(2, 2, 4),
)
INNER = 16  # attention_head_dim * num_attention_heads


def qwen(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.QwenImageTransformer2DModel(**CONFIG)


def networks():
    """Three different tiny Qwen-Image transformers (every loss term non-trivial)."""
    teacher = qwen()
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():
        for net in (student, fake):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return student, teacher, fake


def batch(n: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, C, H, W, generator=g)
    noise = torch.randn(n, C, H, W, generator=g)
    text = torch.randn(n, 5, 12, generator=g)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[0, 3:] = 0
    neg = torch.randn(n, 5, 12, generator=g)
    return latents, noise, text, mask, neg


GAN = {"gan_loss_weight_gen": 0.03, "gan_r1_reg_weight": 10.0, "guidance_scale": 2.5}


def gan_pipeline(cfg=GAN):
    student, teacher, fake = networks()
    attach_feature_capture(teacher, [1, 0], H, W)
    torch.manual_seed(2)
    disc = ImageDiTDiscriminator(inner_dim=INNER, num_heads=2)
    config = DMDConfig(num_train_timesteps=None, **cfg)
    return QwenImageDMDPipeline(student, teacher, fake, config, discriminator=disc)


# --- packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_puts_each_2x2_patch_in_one_token_and_unpack_inverts_it(dtype):
    x = torch.randn(2, C, H, W).to(dtype)
    packed = pack_latents(x)
    # diffusers' QwenImagePipeline._pack_latents, element by element: token (i, j) holds
    # channel c's patch value (dy, dx) at 4c + 2dy + dx.
    expected = torch.empty(2, (H // 2) * (W // 2), 4 * C, dtype=dtype)
    for i in range(H // 2):
        for j in range(W // 2):
            for c in range(C):
                for dy in range(2):
                    for dx in range(2):
                        value = x[:, c, 2 * i + dy, 2 * j + dx]
                        expected[:, i * (W // 2) + j, 4 * c + 2 * dy + dx] = value
    assert torch.equal(packed, expected) and packed.dtype == dtype
    assert torch.equal(unpack_latents(packed, H, W), x)


def test_img_shapes_list_one_frame_per_sample():
    assert build_img_shapes(2, 8, 6) == [[(1, 4, 3)], [(1, 4, 3)]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pack_latents(torch.zeros(1, C, 7, 6)), "even"),
        (lambda: pack_latents(torch.zeros(C, 8, 6)), r"\[B, C, H, W\]"),
        (lambda: unpack_latents(torch.zeros(1, 12, 16), 7, 6), "even"),
        (lambda: unpack_latents(torch.zeros(1, 11, 16), 8, 6), "12"),
        (lambda: unpack_latents(torch.zeros(1, 12, 15), 8, 6), "multiple of 4"),
        (lambda: build_img_shapes(1, 8, 5), "even"),
        (lambda: attach_feature_capture(qwen(), [5], 8, 6), "indices"),
        (lambda: attach_feature_capture(qwen(), [0], 8, 6, blocks_attr="blocks"), "blocks"),
    ],
)
def test_bad_shapes_are_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pipeline_refuses_a_scaled_timestep_and_defaults_to_the_recipe():
    student, teacher, fake = networks()
    with pytest.raises(ValueError, match="num_train_timesteps"):
        QwenImageDMDPipeline(student, teacher, fake, DMDConfig(num_train_timesteps=1000))
    assert QwenImageDMDPipeline(student, teacher, fake).config == load_dmd_config(RECIPE)


# --- the call adapter ---------------------------------------------------------------------


class Recorder(nn.Module):
    """Records its keyword arguments; returns packed zeros in one of diffusers' styles."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style, self.kwargs = style, {}

    def forward(self, **kwargs):
        self.kwargs = kwargs
        out = kwargs["hidden_states"] * 2
        return {"tensor": out, "tuple": (out, None), "sample": SimpleNamespace(sample=out)}[
            self.style
        ]


@pytest.mark.parametrize("style", ["tensor", "tuple", "sample"])
@pytest.mark.parametrize("guidance", [None, 3.5])
def test_call_packs_passes_qwens_keywords_and_unpacks_every_return_style(style, guidance):
    model = Recorder(style)
    x = torch.randn(2, C, H, W)
    t = torch.tensor([0.25, 0.5])
    text, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.long)
    call = QwenImageCall(guidance=guidance)
    out = call(model, "teacher", x, t, text, {"encoder_hidden_states_mask": mask})
    assert torch.equal(out, 2 * x)  # packed, doubled, unpacked
    kw = model.kwargs
    assert torch.equal(kw["hidden_states"], pack_latents(x))
    assert kw["timestep"] is t and kw["encoder_hidden_states"] is text
    assert kw["encoder_hidden_states_mask"] is mask and "txt_seq_lens" not in kw
    assert kw["img_shapes"] == [(1, H // 2, W // 2)] and kw["return_dict"] is False
    if guidance is None:
        assert kw["guidance"] is None
    else:
        assert torch.equal(kw["guidance"], torch.full((2,), guidance))


def test_call_rejects_the_keywords_it_sets_and_non_4d_latents():
    with pytest.raises(TypeError, match="img_shapes"):
        QwenImageCall()(
            Recorder("tensor"),
            "student",
            torch.zeros(1, C, H, W),
            torch.zeros(1),
            None,
            {"img_shapes": []},
        )
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        QwenImageCall()(Recorder("tensor"), "student", torch.zeros(1, 16), torch.zeros(1), None, {})


def test_capture_returns_image_tokens_as_grids():
    teacher = qwen()
    capture = attach_feature_capture(teacher, [1], H, W)
    latents, _, text, mask, _ = batch(2)
    call = QwenImageCall()
    tokens = []
    hook = teacher.transformer_blocks[1].register_forward_hook(
        lambda m, a, out: tokens.append(out[1])
    )
    _, (feature,) = capture.run(
        lambda: call(
            teacher,
            "teacher",
            latents,
            torch.full((2,), 0.5),
            text,
            {"encoder_hidden_states_mask": mask},
        )
    )
    hook.remove()
    assert feature.shape == (2, INNER, H // 2, W // 2)
    grid = tokens[0].reshape(2, H // 2, W // 2, INNER).permute(0, 3, 1, 2)
    assert torch.equal(feature, grid)
    with pytest.raises(ValueError, match="attach the capture again"):
        capture.run(
            lambda: call(teacher, "teacher", torch.zeros(2, C, 4, 4), torch.ones(2), text, {})
        )


def test_dit_discriminator_groups_follow_fastgen():
    assert [dit_group_count(c) for c in (4, 8, 32, 48, 1536)] == [1, 2, 8, 24, 32]
    disc = ImageDiTDiscriminator(inner_dim=INNER, num_heads=2)
    with pytest.raises(ValueError, match="2 heads"):
        disc([torch.zeros(1, INNER, 4, 4)])
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        disc([torch.zeros(1, 8, 4, 4)] * 2)


# --- one DMD2 iteration -------------------------------------------------------------------


def grads(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_one_full_dmd2_iteration_trains_only_the_network_each_loss_trains():
    cfg = {**GAN, "ema": {"decay": 0.5, "fsdp2": False}}
    pipe = gan_pipeline(cfg)
    nets = {"student": pipe.student, "fake_score": pipe.fake_score, "disc": pipe.discriminator}
    latents, noise, text, mask, neg = batch()
    teacher_before = copy.deepcopy(pipe.teacher.state_dict())
    steps = (
        (
            "fake_score",
            lambda: pipe.compute_fake_score_loss(
                latents, noise, text, encoder_hidden_states_mask=mask
            ),
        ),
        (
            "disc",
            lambda: pipe.compute_discriminator_loss(
                latents, noise, text, encoder_hidden_states_mask=mask
            ),
        ),
        (
            "student",
            lambda: pipe.compute_student_loss(
                latents,
                noise,
                text,
                negative_encoder_hidden_states=neg,
                negative_encoder_hidden_states_mask=torch.ones(B, 5, dtype=torch.long),
                encoder_hidden_states_mask=mask,
            ),
        ),
    )
    for trained, loss in steps:
        for name, net in nets.items():
            net.zero_grad(set_to_none=True)
            net.requires_grad_(name == trained)
        out = loss()
        assert all(torch.isfinite(v) for v in out.values()), out
        out["total"].backward()
        assert [name for name, net in nets.items() if grads(net)] == [trained], trained
        assert not any(p.grad is not None for p in pipe.teacher.parameters())
        optimizer = torch.optim.SGD(nets[trained].parameters(), lr=1e-2)
        optimizer.step()
    assert {"r1", "gan_disc"} <= set(steps[1][1]()) and {"vsd", "gan_gen"} <= set(steps[2][1]())
    shadow = {k: v.clone() for k, v in pipe.ema.state_dict().items()}
    pipe.update_ema()
    pipe.update_ema()
    assert any(not torch.equal(shadow[k], v) for k, v in pipe.ema.state_dict().items())
    for k, v in pipe.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


@pytest.mark.parametrize("loss", ["student", "fake_score", "discriminator"])
def test_each_loss_is_one_compiled_frame_for_any_batch(loss):
    pipe = gan_pipeline()
    counter = CompileCounter()
    compiled = torch.compile(
        getattr(pipe, f"compute_{loss}_loss"), backend=counter, fullgraph=True, dynamic=True
    )
    for n in (2, 3):
        latents, noise, text, mask, neg = batch(n)
        extra = {"negative_encoder_hidden_states": neg} if loss == "student" else {}
        out = compiled(latents, noise, text, encoder_hidden_states_mask=mask, **extra)
        assert torch.isfinite(out["total"])
    assert counter.frame_count == 1


# --- parity with modelopt's plugin --------------------------------------------------------


def test_losses_match_modelopts_qwen_image_plugin(monkeypatch):
    mtf_qwen = pytest.importorskip("modelopt.torch.fastgen.plugins.qwen_image")
    mtf = pytest.importorskip("modelopt.torch.fastgen")
    mtf_disc = pytest.importorskip("modelopt.torch.fastgen.discriminators")

    class WithoutTxtSeqLens(diffusers.QwenImageTransformer2DModel):
        # modelopt's plugin passes txt_seq_lens, which diffusers >= 0.36 no longer takes.
        def forward(self, *args, txt_seq_lens=None, **kwargs):
            return super().forward(*args, **kwargs)

    def theirs_copy(net):
        other = WithoutTxtSeqLens(**CONFIG)
        other.load_state_dict(net.state_dict())
        return other

    cfg = {"gan_use_same_t_noise": True, **GAN}
    ours = gan_pipeline(cfg)
    disc = mtf_disc.Discriminator_ImageDiT({0, 1}, num_blocks=2, inner_dim=INNER)
    disc.load_state_dict(ours.discriminator.state_dict())
    teacher = theirs_copy(ours.teacher)
    mtf_qwen.attach_feature_capture(teacher, [0, 1], H, W)
    theirs = mtf_qwen.QwenImageDMDPipeline(
        theirs_copy(ours.student),
        teacher,
        theirs_copy(ours.fake_score),
        mtf.DMDConfig(num_train_timesteps=None, **cfg),
        discriminator=disc,
    )
    latents, noise, text, mask, neg = batch()
    t = torch.rand(B) * 0.9 + 0.05
    eps, z = torch.randn_like(latents), torch.randn_like(latents)
    results = []
    for pipe in (ours, theirs):
        with monkeypatch.context() as m:
            pinned(m, pipe, t, [eps])
            out = pipe.compute_student_loss(
                latents,
                noise,
                text,
                negative_encoder_hidden_states=neg,
                encoder_hidden_states_mask=mask,
            )
            out["student_total"] = out.pop("total")
            pinned(m, pipe, t, [eps])
            fake = pipe.compute_fake_score_loss(
                latents, noise, text, encoder_hidden_states_mask=mask
            )
            out.update({f"fake_{k}": v for k, v in fake.items()})
            pinned(m, pipe, t, [eps, z])
            disc_out = pipe.compute_discriminator_loss(
                latents, noise, text, encoder_hidden_states_mask=mask
            )
            out.update({f"disc_{k}": v for k, v in disc_out.items()})
        results.append(out)
    assert results[0]["gan_gen"] > 0 and results[0]["disc_r1"] > 0 and results[0]["vsd"] > 0
    close(*results)
