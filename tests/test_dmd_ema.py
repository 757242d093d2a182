"""ExponentialMovingAverage: schedules against their formulas, one fused update, dtypes, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastgen import EMAConfig, ExponentialMovingAverage
from fastgen.dmd.ema import ema_decay


@pytest.mark.parametrize("iteration", [1, 2, 10, 1000])
def test_schedules_match_their_formulas(iteration):
    assert ema_decay(EMAConfig(decay=0.97), iteration) == 0.97
    gamma = 16.97
    assert ema_decay(EMAConfig(type="power"), iteration) == pytest.approx(
        (1 - 1 / iteration) ** (gamma + 1), rel=1e-15, abs=0
    )
    # halflife in images: 0.5 ** (images per update / halflife), the halflife capped by the ramp-up
    cfg = EMAConfig(type="halflife", halflife_kimg=2.0, batch_size=64, rampup_ratio=0.05)
    halflife = min(2000.0, 0.05 * 64 * iteration)
    assert ema_decay(cfg, iteration) == pytest.approx(0.5 ** (64 / halflife), rel=1e-15)
    no_ramp = EMAConfig(type="halflife", halflife_kimg=2.0, batch_size=64, rampup_ratio=None)
    assert ema_decay(no_ramp, iteration) == pytest.approx(
        math.exp(-math.log(2) * 64 / 2000), rel=1e-12
    )


def net(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)
    return model


def test_update_is_the_lerp_of_every_parameter_and_copies_buffers():
    model = net()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9))
    ema.update(model, iteration=0)  # the first update copies
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model, iteration=1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            ema.state_dict()[n], 0.9 * start[n] + 0.1 * p.detach(), rtol=1e-6, atol=1e-7
        )
    assert torch.equal(ema.state_dict()["1.running_mean"], torch.full((4,), 5.0))


def test_bf16_model_keeps_float32_shadows_that_move():
    model = net(torch.bfloat16)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9999))
    ema.update(model, iteration=1)
    before = ema.state_dict()["0.weight"].clone()
    assert before.dtype == torch.float32
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, iteration=2)
    # 1e-4 of a unit step: lost in a bf16 shadow (ulp 2^-8 near 1), kept in float32
    torch.testing.assert_close(
        ema.state_dict()["0.weight"] - before, torch.full_like(before, 1e-4), rtol=1e-2, atol=0
    )
    bf16 = ExponentialMovingAverage(model, EMAConfig(decay=0.9999, dtype=None))
    assert bf16.state_dict()["0.weight"].dtype == torch.bfloat16


def _averaged(model, cfg, device):
    model = model.to(device)
    ema = ExponentialMovingAverage(model, cfg)
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.25 * i)
        ema.update(model, iteration=i)
    return ema


def test_cpu_offload_averages_one_parameter_at_a_time_to_the_same_bits():
    # the offloaded update is a loop of lerp_, the fused one a _foreach_lerp_: the same sums
    for dtype in (torch.float32, torch.bfloat16):
        cfg = EMAConfig(decay=0.7)
        fused = _averaged(net(dtype), cfg, "cpu").state_dict()
        offloaded = _averaged(net(dtype), cfg.model_copy(update={"cpu_offload": True}), "cpu")
        assert offloaded.state_dict().keys() == fused.keys()
        for key, shadow in offloaded.state_dict().items():
            assert shadow.dtype == fused[key].dtype and torch.equal(shadow, fused[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host vs device memory needs CUDA")
def test_cpu_offload_keeps_pinned_host_shadows_of_a_cuda_network():
    cfg = EMAConfig(decay=0.7, cpu_offload=True)
    ema = _averaged(net(), cfg, "cuda")
    on_device = _averaged(net(), EMAConfig(decay=0.7), "cuda")
    for key, shadow in ema._shadow.items():
        assert shadow.device.type == "cpu" and shadow.is_pinned(), key
        torch.testing.assert_close(shadow, on_device.state_dict()[key].cpu(), rtol=0, atol=1e-6)
    target = net().cuda()
    ema.copy_to(target)
    assert torch.equal(target[0].weight.cpu(), ema.state_dict()["0.weight"])


def test_start_iter_ignores_then_initialises():
    model = net()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.5, start_iter=3))
    with torch.no_grad():
        ema.state_dict()["0.weight"].zero_()
    ema.update(model, iteration=2)  # before start: ignored
    assert ema.state_dict()["0.weight"].abs().sum() == 0
    ema.update(model, iteration=3)  # at start: copied
    assert torch.equal(ema.state_dict()["0.weight"], model[0].weight.detach())


def test_copy_to_state_dict_and_wrappers():
    model = net()
    ema = ExponentialMovingAverage(
        torch.compile(model), EMAConfig()
    )  # _orig_mod. is looked through
    ema.update(model, iteration=1)
    target = net()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    ema.copy_to(target)
    for a, b in zip(target.parameters(), model.parameters()):
        assert torch.equal(a, b)
    again = ExponentialMovingAverage(model, EMAConfig())
    again.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(KeyError, match="missing"):
        again.load_state_dict({})
    with pytest.raises(KeyError, match="not tracked"):
        ema.update(nn.Linear(2, 2), iteration=2)


def test_halflife_ramp_at_iteration_zero_keeps_nothing():
    # iteration 0 ramps the halflife down to 0 images: the decay is exactly 0 (a copy)
    cfg = EMAConfig(type="halflife", halflife_kimg=2.0, batch_size=64, rampup_ratio=0.05)
    assert ema_decay(cfg, 0) == 0.0


def test_first_update_copies_and_the_first_after_a_load_averages():
    model = net()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.5))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # trained between construction and the first update
    ema.update(model, iteration=7)
    assert torch.equal(ema.state_dict()["0.weight"], model[0].weight.detach())
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    again = ExponentialMovingAverage(model, EMAConfig(decay=0.5))
    again.load_state_dict(saved)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    again.update(model, iteration=8)  # restored shadows are averaged in, not overwritten
    torch.testing.assert_close(again.state_dict()["0.weight"], saved["0.weight"] + 0.5)


def test_fsdp2_parameters_get_plain_shadows_and_copy_back(one_rank_group):
    # One rank suffices to put DTensor parameters in front of the EMA (two ranks: the
    # torchrun tests in test_dmd_distributed.py).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    assert all(isinstance(p, DTensor) for p in model.parameters())
    for mode in ("full_tensor", "local_shard"):
        ema = ExponentialMovingAverage(model, EMAConfig(fsdp2=True, mode=mode))
        ema.update(model, iteration=1)
        shadows = ema.state_dict()
        assert all(type(v) is torch.Tensor for v in shadows.values()), mode
        assert all(torch.equal(shadows[k], plain[k]) for k in plain), mode
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        ema.copy_to(model)
        for k, p in model.state_dict().items():
            assert torch.equal(p.full_tensor(), plain[k]), (mode, k)


def test_ddp_is_looked_through(one_rank_group):
    model = net()
    ema = ExponentialMovingAverage(nn.parallel.DistributedDataParallel(model), EMAConfig())
    assert set(ema.state_dict()) == set(model.state_dict())  # no "module." prefix
    ema.update(nn.parallel.DistributedDataParallel(model), iteration=1)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"^config must be an EMAConfig, got dict$"):
        ExponentialMovingAverage(net(), {"decay": 0.9})
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, got str$"):
        ExponentialMovingAverage("net", EMAConfig())
