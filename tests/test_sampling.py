"""fastgen/sampling.py: the few-step sampler against a hand-written ladder loop (ODE and SDE), in
one frame under torch.compile, exported with a dynamic batch, and its argument errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from toys import ToyDiT

import fastgen
from fastgen.flow_matching import add_noise, pred_x0_from_flow, x0_to_eps

LADDER = [0.999, 0.75, 0.5, 0.25, 0.0]


def hand_ladder(model, noise, t_list, cond, *, fresh=None, scale=None):
    """The loop a user writes: start at t0 * noise, x0 at each rung, re-noise to the next."""
    n = noise.shape[0]
    x = add_noise(torch.zeros_like(noise), noise, torch.full((n,), t_list[0]))
    for k, (t_now, t_next) in enumerate(itertools.pairwise(t_list)):
        t = torch.full((n,), t_now)
        timestep = t if scale is None else (t.double() * scale).float()
        x0 = pred_x0_from_flow(
            model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond).sample, x, t
        )
        if t_next == 0.0:
            return x0
        eps = x0_to_eps(x0, x, t) if fresh is None else fresh[k]
        x = add_noise(x0, eps, torch.full((n,), t_next))
    return x


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyDiT().eval()


def test_ode_equals_the_hand_written_ladder(model):
    noise, cond = torch.randn(3, 4, 8, 8), torch.randn(3, 3, 8)
    got = fastgen.sample(model, noise, LADDER, encoder_hidden_states=cond)
    assert torch.equal(got, hand_ladder(model, noise, LADDER, cond))
    one = fastgen.sample(model, noise, [0.999, 0.0], encoder_hidden_states=cond)
    assert torch.equal(one, hand_ladder(model, noise, [0.999, 0.0], cond))
    assert not torch.equal(one, got)


def test_sde_uses_fresh_noise_from_the_generator(model):
    noise, cond = torch.randn(3, 4, 8, 8), torch.randn(3, 3, 8)
    gen = torch.Generator().manual_seed(7)
    got = fastgen.sample(
        model, noise, LADDER, mode="sde", encoder_hidden_states=cond, generator=gen
    )
    gen = torch.Generator().manual_seed(7)
    fresh = [torch.randn(noise.shape, generator=gen) for _ in LADDER[1:-1]]
    assert torch.equal(got, hand_ladder(model, noise, LADDER, cond, fresh=fresh))
    assert not torch.equal(got, fastgen.sample(model, noise, LADDER, encoder_hidden_states=cond))


def test_num_train_timesteps_scales_the_float32_t_as_the_pipeline_does(model):
    noise, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    got = fastgen.sample(model, noise, LADDER, num_train_timesteps=1000, encoder_hidden_states=cond)
    assert torch.equal(got, hand_ladder(model, noise, LADDER, cond, scale=1000))


def test_compiles_in_one_frame_for_every_batch_and_exports(model, tmp_path):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def run(noise, cond):
        return fastgen.sample(model, noise, LADDER, encoder_hidden_states=cond)

    compiled = torch.compile(run, backend=counter, fullgraph=True, dynamic=True)
    for b in (2, 3, 5):
        noise, cond = torch.randn(b, 4, 8, 8), torch.randn(b, 3, 8)
        assert torch.equal(compiled(noise, cond), run(noise, cond))
    assert counter.frame_count == 1

    class Sampler(torch.nn.Module):
        def forward(self, noise, cond):
            return run(noise, cond)

    batch = torch.export.Dim("batch", min=2)
    with torch.no_grad():
        program = torch.export.export(Sampler(), (torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)),
                                      dynamic_shapes=({0: batch}, {0: batch}))  # fmt: skip
    noise, cond = torch.randn(6, 4, 8, 8), torch.randn(6, 3, 8)
    assert torch.equal(program.module()(noise, cond), run(noise, cond))


def test_argument_errors(model):
    noise = torch.randn(2, 4, 8, 8)
    with pytest.raises(
        ValueError, match=r"t_list must hold at least 2 rungs and end in 0, got \[0.5, 0.1\]"
    ):
        fastgen.sample(model, noise, [0.5, 0.1])
    with pytest.raises(ValueError, match="mode must be 'ode' or 'sde', got 'euler'"):
        fastgen.sample(model, noise, LADDER, mode="euler")
    with pytest.raises(TypeError, match="the model returned int"):
        fastgen.sample(lambda **kw: 3, noise, LADDER)
