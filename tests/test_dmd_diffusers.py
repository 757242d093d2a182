"""Real diffusers transformers (tiny, randomly initialised) inside one compiled DMD2 iteration:
SD3 (timesteps in [0, 1000], pooled projections, CFG with negative conditioning, GAN with
features tapped from two joint blocks) and Flux (packed tokens, rotary ids)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fastgen
from fastgen import Discriminator, DMDConfig, DMDPipeline

diffusers = pytest.importorskip("diffusers")
B = 3


def perturbed_copy(net, scale=0.02):
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def sd3_setup():
    torch.manual_seed(0)
    teacher = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=16,
    )  # fmt: skip
    student, fake = perturbed_copy(teacher), fastgen.create_fake_score(perturbed_copy(teacher))
    # SD3's joint blocks return (encoder_hidden_states, hidden_states): tap the image tokens
    fastgen.attach_feature_capture(teacher, [0, 1], blocks="transformer_blocks", output_index=1)
    disc = Discriminator([16, 16], layout="tokens", grid=(4, 4), hidden=16)
    cfg = DMDConfig(
        num_train_timesteps=1000, guidance_scale=3.0, gan_loss_weight_gen=0.03,
        gan_r1_reg_weight=1.0, ema={"decay": 0.9},
    )  # fmt: skip
    pipe = DMDPipeline(student, teacher, fake, cfg, discriminator=disc)
    pooled = torch.randn(B, 12)
    batch = (torch.randn(B, 4, 8, 8), torch.randn(B, 4, 8, 8), torch.randn(B, 5, 16))
    student_kwargs = {
        "pooled_projections": pooled,
        "negative_encoder_hidden_states": torch.zeros(B, 5, 16),
        "negative_model_kwargs": {"pooled_projections": torch.zeros(B, 12)},
    }
    return pipe, batch, {"pooled_projections": pooled}, student_kwargs


def flux_setup():
    torch.manual_seed(0)
    teacher = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12,
        guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    student, fake = perturbed_copy(teacher), fastgen.create_fake_score(perturbed_copy(teacher))
    fastgen.attach_feature_capture(teacher, ["transformer_blocks.0"], output_index=1)
    disc = Discriminator([16], layout="tokens", grid=(4, 4), hidden=16)
    cfg = DMDConfig(gan_loss_weight_gen=0.03, ema={"decay": 0.9})
    pipe = DMDPipeline(student, teacher, fake, cfg, discriminator=disc)
    img_ids = torch.stack(
        [torch.zeros(16), torch.arange(4.0).repeat_interleave(4), torch.arange(4.0).repeat(4)], 1
    )
    kwargs = {
        "pooled_projections": torch.randn(B, 12),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(5, 3),
    }
    batch = (torch.randn(B, 16, 16), torch.randn(B, 16, 16), torch.randn(B, 5, 16))
    return pipe, batch, kwargs, kwargs


@pytest.mark.parametrize("setup", [sd3_setup, flux_setup], ids=["sd3", "flux"])
def test_one_compiled_dmd2_iteration(setup):
    pipe, batch, kwargs, student_kwargs = setup()
    nets = {
        "student": pipe.student,
        "fake_score": pipe.fake_score,
        "discriminator": pipe.discriminator,
    }
    opts = {name: torch.optim.SGD(net.parameters(), lr=1e-2) for name, net in nets.items()}
    steps = [
        ("fake_score", pipe.compute_fake_score_loss, kwargs),
        ("discriminator", pipe.compute_discriminator_loss, kwargs),
        ("student", pipe.compute_student_loss, student_kwargs),
    ]
    for name, fn, kw in steps:
        eager_seed = torch.random.get_rng_state()
        eager = fn(*batch, **kw)
        counter = CompileCounter()
        torch.random.set_rng_state(eager_seed)
        compiled = torch.compile(fn, backend=counter, fullgraph=True)(*batch, **kw)
        assert counter.frame_count == 1, name  # the whole loss, the transformer inside, one graph
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-7)
        for net in nets.values():
            net.zero_grad(set_to_none=True)
        compiled["total"].backward()
        touched = {
            n for n, net in nets.items() if any(p.grad is not None for p in net.parameters())
        }
        assert touched == {name}, (name, touched)
        assert all(p.grad is None for p in pipe.teacher.parameters())
        before = [p.detach().clone() for p in nets[name].parameters()]
        opts[name].step()
        assert any(not torch.equal(a, p) for a, p in zip(before, nets[name].parameters()))
    pipe.update_ema()
    pipe.update_ema()
    assert set(pipe.ema.state_dict()) >= {n for n, _ in pipe.student.named_parameters()}
    assert "gan_gen" in eager and "gan_disc" not in eager


def test_discriminator_layouts_and_groups():
    spatial = Discriminator([8, 12], hidden=24)
    logits = spatial([torch.randn(2, 8, 8, 8), torch.randn(2, 12, 4, 4)])
    assert logits.shape == (2, 2)
    norms = [m for m in spatial.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert {m.num_groups for m in norms} == {fastgen.dmd.group_count(24)} == {6}
    tokens = Discriminator([16], layout="tokens")
    assert tokens([torch.randn(2, 9, 16)]).shape == (2, 1)
    with pytest.raises(ValueError, match="3-D"):
        tokens([torch.randn(2, 16, 3, 3)])
    with pytest.raises(ValueError, match="1 heads"):
        tokens([torch.randn(2, 9, 16)] * 2)
    with pytest.raises(ValueError, match="grid"):
        Discriminator([16], grid=(3, 3))
