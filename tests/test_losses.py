"""DMD2 losses: DSM targets per parameterization and the VSD gradient identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgen import dsm_loss, vsd_loss
from fastgen.losses import VSD_WEIGHT_EPS


def targets(x0, eps):
    return {"x0": x0, "eps": eps, "flow": eps - x0}


@pytest.mark.parametrize("pred_type", ["x0", "eps", "flow"])
def test_dsm_loss_is_mse_to_the_right_target(pred_type):
    x0, eps = torch.randn(8, 3, 4, dtype=torch.float64), torch.randn(8, 3, 4, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64)
    target = targets(x0, eps)[pred_type]
    assert dsm_loss(target, x0=x0, eps=eps, t=t, pred_type=pred_type) == 0
    pred = target + torch.randn_like(target)
    expected = ((pred - target) ** 2).mean()
    torch.testing.assert_close(
        dsm_loss(pred, x0=x0, eps=eps, t=t, pred_type=pred_type), expected, rtol=1e-15, atol=0
    )
    for other in {"x0", "eps", "flow"} - {pred_type}:  # and not against the other targets
        assert dsm_loss(target, x0=x0, eps=eps, t=t, pred_type=other) > 0.1


def test_dsm_loss_dtype_and_gradient():
    x0, eps = torch.randn(8, 5), torch.randn(8, 5)
    pred = torch.randn(8, 5, dtype=torch.bfloat16, requires_grad=True)
    loss = dsm_loss(pred, x0=x0, eps=eps, t=torch.rand(8), pred_type="flow")
    assert loss.dtype == torch.bfloat16 and loss.ndim == 0
    loss.backward()
    expected = 2 * (pred.detach().double() - (eps - x0).double()) / pred.numel()
    torch.testing.assert_close(pred.grad.double(), expected, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vsd_gradient_is_the_dmd_gradient_over_numel(dtype):
    gen = torch.randn(6, 3, 4, 4, dtype=dtype, requires_grad=True)
    teacher_x0 = torch.randn(6, 3, 4, 4, dtype=dtype, requires_grad=True)
    fake_x0 = torch.randn(6, 3, 4, 4, dtype=dtype, requires_grad=True)
    vsd_loss(gen, teacher_x0, fake_x0).backward()
    g, r, f = (x.detach().double() for x in (gen, teacher_x0, fake_x0))
    weight = 1.0 / ((g - r).abs().mean(dim=(1, 2, 3), keepdim=True) + VSD_WEIGHT_EPS)
    dmd_grad = (f - r) * weight
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gen.grad.double(), dmd_grad / gen.numel(), rtol=tol, atol=tol)
    assert teacher_x0.grad is None and fake_x0.grad is None  # only the generator learns


def test_vsd_loss_value_and_fixed_point():
    gen = torch.randn(4, 10, dtype=torch.float64)
    same = gen + torch.randn_like(gen)
    assert vsd_loss(gen, same, same) == 0  # fake == real: nothing to match
    teacher_x0, fake_x0 = torch.randn_like(gen), torch.randn_like(gen)
    weight = 1.0 / ((gen - teacher_x0).abs().mean(dim=1, keepdim=True) + VSD_WEIGHT_EPS)
    expected = 0.5 * (((fake_x0 - teacher_x0) * weight) ** 2).mean()
    torch.testing.assert_close(vsd_loss(gen, teacher_x0, fake_x0), expected, rtol=1e-12, atol=0)


def test_vsd_step_moves_gen_towards_the_teacher():
    # a gradient step on the loss moves gen by -(fake - real) * w: towards real where fake is off
    x0 = torch.randn(16, 2, dtype=torch.float64)
    gen = (x0 + 1.0).requires_grad_()
    teacher_x0, fake_x0 = x0, gen.detach()
    vsd_loss(gen, teacher_x0, fake_x0).backward()
    stepped = gen.detach() - 0.1 * gen.numel() * gen.grad
    assert (stepped - x0).abs().mean() < (gen.detach() - x0).abs().mean()


BAD = [
    (
        lambda: dsm_loss(
            torch.zeros(2, 3),
            x0=torch.zeros(2, 3),
            eps=torch.zeros(2, 3),
            t=torch.rand(2),
            pred_type="v",
        ),
        ValueError,
        "pred_type",
    ),
    (
        lambda: dsm_loss(
            torch.zeros(2, 3),
            x0=torch.zeros(2, 4),
            eps=torch.zeros(2, 3),
            t=torch.rand(2),
            pred_type="x0",
        ),
        ValueError,
        "pred and x0 must have the same shape",
    ),
    (
        lambda: dsm_loss(
            torch.zeros(2, 3),
            x0=torch.zeros(2, 3),
            eps=torch.zeros(2, 3),
            t=torch.rand(3),
            pred_type="x0",
        ),
        ValueError,
        "t cannot broadcast",
    ),
    (lambda: vsd_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4)), ValueError, "ndim >= 2"),
    (
        lambda: vsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3)),
        ValueError,
        "gen and fake_x0",
    ),
    (
        lambda: vsd_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)),
        TypeError,
        "teacher_x0",
    ),
]


@pytest.mark.parametrize(("call", "error", "words"), BAD, ids=[b[2] for b in BAD])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


# --- GAN losses ---------------------------------------------------------------------------------


def _softplus64(x):
    # log(1 + e^x), written out in float64 (stable form: max(x, 0) + log1p(e^-|x|))
    x = x.double()
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gan_losses_equal_float64_references(dtype):
    from fastgen import gan_disc_loss, gan_gen_loss, r1_loss

    real, fake = (
        (torch.randn(16, 3, dtype=torch.float64) * 4).to(dtype),
        (torch.randn(16, 3) * 4).to(dtype),
    )
    perturbed = (real.double() + 0.1 * torch.randn(16, 3, dtype=torch.float64)).to(dtype)
    expected = {
        "gen": _softplus64(-fake).mean(),
        "disc": _softplus64(fake).mean() + _softplus64(-real).mean(),
        "r1": ((real.double() - perturbed.double()) ** 2).mean(),
    }
    got = {
        "gen": gan_gen_loss(fake),
        "disc": gan_disc_loss(real, fake),
        "r1": r1_loss(real, perturbed),
    }
    for key, value in got.items():
        assert value.dtype == dtype and value.ndim == 0
        assert value.item() == expected[key].to(dtype).item(), (
            key
        )  # one rounding of the float64 value


def test_gan_losses_gradients_and_bad_input():
    from fastgen import gan_disc_loss, gan_gen_loss, r1_loss

    fake = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(gan_gen_loss(fake), fake)
    torch.testing.assert_close(g, -torch.sigmoid(-fake.detach()) / fake.numel())
    for call, words in (
        (lambda: gan_gen_loss(torch.randn(8)), "2-D"),
        (lambda: gan_disc_loss(torch.randn(8, 1), torch.randn(8, 1, 1)), "fake_logits must be 2-D"),
        (lambda: r1_loss(torch.randn(8, 2), torch.randn(8, 3)), "same shape"),
        (lambda: gan_gen_loss(torch.ones(8, 2, dtype=torch.long)), "floating-point"),
    ):
        with pytest.raises((ValueError, TypeError), match=words):
            call()


def test_gan_losses_compile_in_one_frame():
    from torch._dynamo.testing import CompileCounter

    from fastgen import gan_disc_loss, gan_gen_loss, r1_loss

    def step(real, fake, perturbed):
        return gan_gen_loss(fake) + gan_disc_loss(real, fake) + r1_loss(real, perturbed)

    counter = CompileCounter()
    args = [torch.randn(6, 2) for _ in range(3)]
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    assert torch.equal(compiled(*args), step(*args)) and counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vsd_additional_scale_equals_float64_reference(dtype):
    torch.manual_seed(4)
    gen = torch.randn(4, 3, 5, dtype=torch.float64).to(dtype).requires_grad_(True)
    teacher, fake = torch.randn(4, 3, 5).to(dtype), torch.randn(4, 3, 5).to(dtype)
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0])
    loss = vsd_loss(gen, teacher, fake, scale)
    g, t, f = gen.detach().double(), teacher.double(), fake.double()
    w = scale.double()[:, None, None] / ((g - t).abs().mean(dim=(1, 2), keepdim=True) + 1e-6)
    expected = 0.5 * (((f - t) * w) ** 2).mean()
    assert loss.dtype == dtype and loss.item() == expected.to(dtype).item()
    (grad,) = torch.autograd.grad(loss, gen)
    torch.testing.assert_close(
        grad.double(),
        ((f - t) * w / g.numel()),
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
        atol=0,
    )
    with pytest.raises(TypeError, match="additional_scale"):
        vsd_loss(gen, teacher, fake, torch.ones(4, dtype=torch.long))


def test_loss_errors_name_their_arguments():
    from fastgen import gan_disc_loss, gan_gen_loss, r1_loss

    x = torch.randn(4, 2)
    cases = [
        (lambda: gan_gen_loss(torch.randn(4)), ValueError, "^fake_logits must be 2-D"),
        (lambda: gan_gen_loss([1.0]), TypeError, "^fake_logits must be a torch.Tensor"),
        (lambda: gan_disc_loss(torch.randn(4), x), ValueError, "^real_logits must be 2-D"),
        (lambda: r1_loss(torch.randn(4), x), ValueError, "^real_logits must be 2-D"),
        (lambda: r1_loss(x, torch.randn(4)), ValueError, "^real_logits_perturbed must be 2-D"),
        (lambda: r1_loss(x, torch.randn(4, 3)), ValueError, "^real_logits and real_logits_perturbed"),
        (lambda: dsm_loss(x, x0=x, eps=torch.randn(4, 3), t=torch.rand(4), pred_type="flow"), ValueError, "^pred and eps"),
        (lambda: dsm_loss(x, x0=torch.randn(4, 3), eps=x, t=torch.rand(4), pred_type="flow"), ValueError, "^pred and x0"),
        (lambda: vsd_loss(x, torch.randn(4, 3), x), ValueError, "^gen and teacher_x0"),
        (lambda: vsd_loss(x, x, x, torch.ones(4, dtype=torch.long)), TypeError, "^additional_scale must be a floating"),
    ]  # fmt: skip
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


def test_gan_losses_are_computed_in_float64_where_float32_rounds():
    from fastgen import gan_disc_loss, gan_gen_loss

    # A float32 softplus is not correctly rounded everywhere (at -x = 14.697 it is one ulp off):
    # find such logits, then check the losses give the float64 value rounded once.
    x = torch.linspace(-20, 20, 400_001, dtype=torch.float32)
    off = x[F.softplus(-x) != F.softplus(-x.double()).float()][:64]
    assert len(off) == 64
    for value in off:
        logit = value.reshape(1, 1)
        assert gan_gen_loss(logit).item() == _softplus64(-logit).float().item()
        assert gan_disc_loss(-logit, logit).item() == (2 * _softplus64(logit)).float().item()


@pytest.mark.parametrize("pred_type", ["x0", "eps", "flow"])
def test_dsm_and_r1_losses_are_the_float64_value_rounded_once(pred_type):
    from fastgen import r1_loss

    # A float32 mean of squares differs from the float64 one rounded once in most batches.
    gen = torch.Generator().manual_seed(3)
    mismatched = 0
    for _ in range(20):
        x0, eps, pred = (torch.randn(64, 7, generator=gen) for _ in range(3))
        target = targets(x0.double(), eps.double())[pred_type]
        loss = dsm_loss(pred, x0=x0, eps=eps, t=torch.rand(64, generator=gen), pred_type=pred_type)
        want = ((pred.double() - target) ** 2).mean().float()
        assert torch.equal(loss, want)
        real, fake = x0[:, :2], eps[:, :2]
        assert torch.equal(
            r1_loss(real, fake), ((real.double() - fake.double()) ** 2).mean().float()
        )
        mismatched += int(((pred - targets(x0, eps)[pred_type]) ** 2).mean() != want)
    assert mismatched > 0  # the float32 formula would have failed
