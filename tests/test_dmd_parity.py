"""Side by side with modelopt.torch.fastgen: same networks, inputs, timesteps and noise give the
same losses (1e-6 relative, float32).

Randomness is pinned in both libraries the same way: ``pipeline.sample_timesteps`` returns
given timesteps, ``torch.randint`` a given rung, and ``torch.randn_like`` pops given tensors in
the order each library draws them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity import close, pinned
from toys import ToyDiT, ToyTokenDiscriminator, toy_batch

import fastgen
from fastgen import DMDConfig, DMDPipeline

mtf = pytest.importorskip("modelopt.torch.fastgen")

LADDER = [0.999, 0.937, 0.833, 0.624, 0.0]
B = 5


def networks(seed=0):
    torch.manual_seed(seed)
    teacher = ToyDiT()
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():  # three different networks, so every term is non-trivial
        for net in (student, fake):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return student, teacher, fake


def both(cfg_kwargs, seed=0, discriminator=None):
    student, teacher, fake = networks(seed)
    if discriminator is not None:
        fastgen.attach_feature_capture(teacher, [0, 1], blocks="transformer_blocks")
    ours = DMDPipeline(student, teacher, fake, DMDConfig(**cfg_kwargs), discriminator=discriminator)
    theirs = mtf.DMDPipeline(
        student, teacher, fake, mtf.DMDConfig(**cfg_kwargs), discriminator=discriminator
    )
    return ours, theirs


def sample_cfg(kind="shifted", t_list=None):
    cfg = {"time_dist_type": kind, "min_t": 0.001, "max_t": 0.999}
    if t_list is not None:
        cfg["t_list"] = t_list
    return cfg


CASES = [
    pytest.param({}, id="1step"),
    pytest.param({"guidance_scale": 3.0}, id="1step-cfg"),
    pytest.param({"fake_score_pred_type": "eps"}, id="1step-fake-eps"),
    pytest.param({"fake_score_pred_type": "flow"}, id="1step-fake-flow"),
    # ("v", fake None) is left out on purpose: modelopt converts a "v" output as flow but
    # regresses it on (1 - t) eps - t x0; fastgen reads "v" as flow throughout (see test_dmd_pipeline).
    pytest.param({"fake_score_pred_type": "x0", "pred_type": "v"}, id="1step-v"),
    pytest.param({"pred_type": "eps", "fake_score_pred_type": "x0"}, id="1step-eps-native"),
    pytest.param({"pred_type": "x0", "fake_score_pred_type": "eps"}, id="1step-x0-native"),
    pytest.param({"num_train_timesteps": 1000, "timestep_dtype": "latents"}, id="1step-t1000"),
    pytest.param(
        {"student_sample_steps": 4, "sample_t_cfg": sample_cfg(t_list=LADDER)}, id="4step-real"
    ),
    pytest.param(
        {
            "student_sample_steps": 4,
            "guidance_scale": 2.0,
            "fake_score_pred_type": "eps",
            "sample_t_cfg": sample_cfg(t_list=LADDER),
        },
        id="4step-real-cfg",
    ),
]


def drop_timestep_dtype(kwargs):
    # timestep_dtype is fastgen's; modelopt always casts to the latents' dtype.
    return {k: v for k, v in kwargs.items() if k != "timestep_dtype"}


@pytest.mark.parametrize("cfg", CASES)
@pytest.mark.parametrize("rung", [0, 2])
def test_student_and_fake_score_losses_match_modelopt(monkeypatch, cfg, rung):
    if rung and cfg.get("student_sample_steps", 1) == 1:
        pytest.skip("one-step students have no rung")
    student, teacher, fake = networks()
    ours = DMDPipeline(student, teacher, fake, DMDConfig(**cfg))
    theirs = mtf.DMDPipeline(student, teacher, fake, mtf.DMDConfig(**drop_timestep_dtype(cfg)))
    latents, noise, cond, neg = toy_batch(B)
    t = torch.rand(B) * 0.9 + 0.05
    eps = torch.randn_like(latents)
    kwargs = {"negative_encoder_hidden_states": neg} if "guidance_scale" in cfg else {}
    results = []
    for pipe in (ours, theirs):
        with monkeypatch.context() as m:
            pinned(m, pipe, t, [eps], rung=rung)
            student = pipe.compute_student_loss(latents, noise, cond, **kwargs)
            pinned(m, pipe, t, [eps], rung=rung)
            fake = pipe.compute_fake_score_loss(latents, noise, cond)
        results.append({**student, **{f"fake_{k}": v for k, v in fake.items()}})
    assert results[0]["vsd"] > 0 and results[0]["fake_fake_score"] > 0
    # eps -> x0 divides by 1 - t >= 0.001 at the student's t = 0.999; modelopt rounds each x0 to
    # float32 before the VSD difference (fastgen keeps float64), which moves its loss by ~4e-6.
    close(*results, rtol=1e-5 if cfg.get("pred_type") == "eps" else 1e-6)


@pytest.mark.parametrize("sample_type", ["ode", "sde"])
@pytest.mark.parametrize("rung", [0, 1, 2, 3])
def test_backward_simulation_matches_modelopt_at_every_rung(monkeypatch, sample_type, rung):
    cfg = {
        "student_sample_steps": 4,
        "backward_simulation": True,
        "student_sample_type": sample_type,
        "guidance_scale": 2.5,
        "sample_t_cfg": sample_cfg(t_list=LADDER),
    }
    ours, theirs = both(cfg)
    latents, noise, cond, neg = toy_batch(B)
    t = torch.rand(B) * 0.9 + 0.05
    start, eps = torch.randn_like(latents), torch.randn_like(latents)
    step_noise = [torch.randn_like(latents) for _ in range(2)]  # transitions 0->1, 1->2
    # fastgen always unrolls to the deepest rung (same draws whatever the rung);
    # modelopt unrolls to the chosen rung only, and draws no start noise at rung 0.
    ours_draws = [start, *(step_noise if sample_type == "sde" else []), eps]
    theirs_draws = (
        [eps]
        if rung == 0
        else [start, *(step_noise[: rung - 1] if sample_type == "sde" else []), eps]
    )
    results = []
    for pipe, draws in ((ours, ours_draws), (theirs, theirs_draws)):
        with monkeypatch.context() as m:
            left = pinned(m, pipe, t, draws, rung=rung)
            out = pipe.compute_student_loss(
                latents, noise, cond, negative_encoder_hidden_states=neg
            )
            assert not left
            pinned(m, pipe, t, draws, rung=rung)
            fake = pipe.compute_fake_score_loss(latents, noise, cond)
        results.append({**out, **{f"fake_{k}": v for k, v in fake.items()}})
    close(*results)


class ModeloptCapture:
    """modelopt's capture protocol on a teacher: hooks append to ``teacher._fastgen_captured``."""

    def __init__(self, teacher, indices):
        teacher._fastgen_captured = []
        for i in indices:
            teacher.transformer_blocks[i].register_forward_hook(
                lambda m, a, out: teacher._fastgen_captured.append(out)
            )


@pytest.mark.parametrize("same_t_noise", [False, True])
def test_gan_losses_match_modelopt(monkeypatch, same_t_noise):
    cfg = {
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": same_t_noise,
        "guidance_scale": 2.0,
    }
    torch.manual_seed(1)
    disc = ToyTokenDiscriminator()
    ours, theirs = both(cfg, discriminator=disc)
    ModeloptCapture(theirs.teacher, [0, 1])
    latents, noise, cond, neg = toy_batch(B)
    t, t_real = torch.rand(B) * 0.9 + 0.05, torch.rand(B) * 0.9 + 0.05
    eps, eps_real = torch.randn_like(latents), torch.randn_like(latents)
    results = []
    for pipe in (ours, theirs):
        with monkeypatch.context() as m:
            pinned(m, pipe, t, [eps])
            out = pipe.compute_student_loss(
                latents, noise, cond, negative_encoder_hidden_states=neg
            )
            pinned(m, pipe, t, [eps, eps_real])
            times = iter([t, t_real])
            m.setattr(pipe, "sample_timesteps", lambda n, times=times, **kw: next(times))
            out.update(pipe.compute_discriminator_loss(latents, noise, cond))
            out["disc_total"] = out.pop("total")
        theirs.teacher._fastgen_captured.clear()
        results.append(out)
    assert results[0]["gan_gen"] > 0 and results[0]["gan_disc"] > 0
    close(*results)


def test_r1_matches_modelopt(monkeypatch):
    cfg = {"gan_loss_weight_gen": 0.03, "gan_r1_reg_weight": 100.0, "gan_use_same_t_noise": True}
    torch.manual_seed(2)
    disc = ToyTokenDiscriminator()
    ours, theirs = both(cfg, discriminator=disc)
    ModeloptCapture(theirs.teacher, [0, 1])
    latents, noise, cond, _ = toy_batch(B)
    t = torch.rand(B) * 0.9 + 0.05
    eps, z = torch.randn_like(latents), torch.randn_like(latents)
    results = []
    for pipe in (ours, theirs):
        with monkeypatch.context() as m:
            pinned(m, pipe, t, [eps, z])
            results.append(pipe.compute_discriminator_loss(latents, noise, cond))
        theirs.teacher._fastgen_captured.clear()
    assert results[0]["r1"] > 0
    close(*results)


def test_functions_match_modelopt():
    torch.manual_seed(3)
    gen, teacher, fake = (torch.randn(4, 3, 5) for _ in range(3))
    scale = torch.rand(4) + 0.5
    close(
        {"vsd": fastgen.vsd_loss(gen, teacher, fake, scale)},
        {"vsd": mtf.losses.vsd_loss(gen, teacher, fake, scale)},
    )
    cond, uncond = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(
        fastgen.classifier_free_guidance(cond, uncond, 4.5),
        mtf.utils.classifier_free_guidance(cond, uncond, 4.5),
        rtol=1e-6,
        atol=1e-6,
    )
    real, fake_logits = torch.randn(4, 2), torch.randn(4, 2)
    for ours, theirs in (
        (fastgen.gan_gen_loss(fake_logits), mtf.losses.gan_gen_loss(fake_logits)),
        (fastgen.gan_disc_loss(real, fake_logits), mtf.losses.gan_disc_loss(real, fake_logits)),
        (fastgen.r1_loss(real, fake_logits), mtf.losses.r1_loss(real, fake_logits)),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_modelopt_recipe_loads_unchanged():
    import os

    import modelopt_recipes

    path = os.path.join(
        os.path.dirname(modelopt_recipes.__file__), "general/distillation/dmd2_qwen_image.yaml"
    )
    ours = fastgen.load_dmd_config(path)
    theirs = mtf.load_dmd_config("general/distillation/dmd2_qwen_image")
    for field in ("pred_type", "guidance_scale", "student_sample_steps", "fake_score_pred_type"):
        assert getattr(ours, field) == getattr(theirs, field)
    assert list(ours.sample_t_cfg.t_list) == theirs.sample_t_cfg.t_list
    assert ours.sample_t_cfg.p_mean == theirs.sample_t_cfg.p_mean
    assert ours.ema.decay == theirs.ema.decay and ours.ema.mode == theirs.ema.mode
    assert fastgen.load_dmd_config("general/distillation/dmd2_qwen_image") == ours


def test_bare_configs_agree_on_every_shared_default():
    ours, theirs = DMDConfig(), mtf.DMDConfig()
    for field in mtf.DMDConfig.model_fields:
        if field in ("sample_t_cfg", "ema"):
            continue
        assert getattr(ours, field) == getattr(theirs, field), field
    s_ours, s_theirs = ours.sample_t_cfg, theirs.sample_t_cfg
    for field in ("time_dist_type", "min_t", "max_t", "shift", "p_mean", "p_std", "t_list"):
        assert getattr(s_ours, field) == getattr(s_theirs, field), field
    e_ours, e_theirs = fastgen.EMAConfig(), mtf.EMAConfig()
    for field in mtf.EMAConfig.model_fields:
        assert getattr(e_ours, field) == getattr(e_theirs, field), field
