"""The stateless module wrappers: same numbers as the functions, no state, and DDP."""

from __future__ import annotations

import copy
import os
import pickle
import sys

import pydantic
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastgen import (
    ParamConverter,
    RFForward,
    SampleTimestepConfig,
    TimestepSampler,
    add_noise,
    convert_prediction,
    dsm_loss,
    sample_from_t_list,
    sample_timesteps,
)

PAIRS = [(s, d) for s in ("x0", "eps", "flow") for d in ("x0", "eps", "flow")]
LADDER = (0.999, 0.9375, 0.8, 0.0)


def modules():
    cfg = SampleTimestepConfig(time_dist_type="shifted", shift=3.0, t_list=LADDER)
    return [RFForward(), ParamConverter("eps", "flow"), TimestepSampler(cfg)]


def test_rf_forward_is_add_noise():
    x0, eps, t = torch.randn(5, 3, 2, dtype=torch.bfloat16), torch.randn(5, 3, 2), torch.rand(5)
    assert torch.equal(RFForward()(x0, eps, t), add_noise(x0, eps, t))


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_param_converter_is_convert_prediction(src, dst):
    pred, x_t, t = torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float16), torch.rand(4)
    out = ParamConverter(src, dst)(pred, x_t, t)
    assert out.dtype == torch.float16
    assert torch.equal(out, convert_prediction(pred, x_t, t, src=src, dst=dst))


def test_param_converter_rejects_unknown_names():
    with pytest.raises(pydantic.ValidationError, match="src"):
        ParamConverter("v", "x0")
    with pytest.raises(ValueError, match="dst"):  # ValidationError is a ValueError
        ParamConverter("x0", "score")


def test_timestep_sampler_draws_like_the_function():
    cfg = SampleTimestepConfig(time_dist_type="logitnormal", stratified=True, t_list=LADDER)
    sampler = TimestepSampler(cfg)
    x = torch.zeros(32, 4, dtype=torch.bfloat16)
    torch.manual_seed(4)
    t = sampler(x)
    torch.manual_seed(4)
    assert torch.equal(t, sample_timesteps(32, cfg, device="cpu"))
    assert t.shape == (32,) and t.dtype == torch.float32 and t.device == x.device
    torch.manual_seed(4)
    t, k = sampler.sample_t_list(x)
    torch.manual_seed(4)
    t_ref, k_ref = sample_from_t_list(32, LADDER, device="cpu", return_index=True)
    assert torch.equal(t, t_ref) and torch.equal(k, k_ref)
    assert torch.equal(sampler.t_list[k].float(), t)
    assert bool((sampler.t_list[k + 1] < sampler.t_list[k]).all())


def test_timestep_sampler_errors():
    with pytest.raises(TypeError, match="cfg must be a SampleTimestepConfig"):
        TimestepSampler({"time_dist_type": "uniform"})
    sampler = TimestepSampler(SampleTimestepConfig())
    assert sampler.t_list is None
    with pytest.raises(ValueError, match=r"cfg\.t_list"):
        sampler.sample_t_list(torch.zeros(2))


@pytest.mark.parametrize("module", modules(), ids=lambda m: type(m).__name__)
def test_stateless(module):
    assert list(module.parameters()) == []
    assert module.state_dict() == {}
    clone = copy.deepcopy(module)
    restored = pickle.loads(pickle.dumps(module))
    for other in (clone, restored):
        assert repr(other) == repr(module)
        if isinstance(module, TimestepSampler):
            assert other.config == module.config


def test_repr_shows_the_config():
    assert repr(ParamConverter("flow", "x0")) == "ParamConverter(src='flow', dst='x0')"
    text = repr(TimestepSampler(SampleTimestepConfig(time_dist_type="mode", t_list=LADDER)))
    assert "time_dist_type='mode'" in text and "t_list=(0.999" in text


def test_t_list_buffer_follows_to_but_stays_out_of_state_dict():
    sampler = TimestepSampler(SampleTimestepConfig(t_list=LADDER))
    assert sampler.t_list.dtype == torch.float32
    assert sampler.t_list.tolist() == [float(torch.tensor(r, dtype=torch.float32)) for r in LADDER]
    moved = copy.deepcopy(sampler).to("meta")
    assert moved.t_list.device.type == "meta"
    holder = nn.ModuleDict({"sampler": sampler})
    assert holder.state_dict() == {}


class Student(nn.Module):
    """A user's module composing all three wrappers around a small network."""

    def __init__(self) -> None:
        super().__init__()
        self.sampler = TimestepSampler(SampleTimestepConfig(time_dist_type="logitnormal"))
        self.noise = RFForward()
        self.to_flow = ParamConverter("x0", "flow")
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn_like(x0)
        t = self.sampler(x0)
        x_t = self.noise(x0, eps, t)
        x0_hat = self.net(torch.cat([x_t, t[:, None]], dim=1))
        flow = self.to_flow(x0_hat, x_t, t)
        return dsm_loss(flow, x0=x0, eps=eps, t=t, pred_type="flow"), t


def test_composes_inside_a_users_module():
    model = Student()
    loss, t = model(torch.randn(16, 2))
    loss.backward()
    assert all(p.grad is not None for p in model.net.parameters())
    assert t.shape == (16,)
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on both ranks ...
    model = Student()
    ddp = nn.parallel.DistributedDataParallel(model)
    step = torch.compile(ddp, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # ... and a different stream of timesteps per rank
    draws = []
    for _ in range(3):
        opt.zero_grad()
        loss, t = step(torch.randn(8, 2))
        loss.backward()
        opt.step()
        draws.append(t.detach())
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"t": torch.cat(draws), "params": flat}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # The results are out. Skip interpreter teardown: torch's background threads (compile
    # workers) occasionally abort it on this box ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)


def test_ddp_two_ranks_compiled(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["t"], r1["t"])  # ranks draw their own timesteps
    assert torch.equal(r0["params"], r1["params"])  # gradients were averaged: in sync
    start = torch.cat(
        [p.detach().flatten() for p in (torch.manual_seed(0), Student())[1].parameters()]
    )
    assert not torch.equal(r0["params"], start)  # and they did train
