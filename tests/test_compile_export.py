"""The compile/export contract, for every public callable.

One frame under ``fullgraph=True`` (CompileCounter), bitwise equality with eager under the
``eager`` and ``aot_eager`` backends (and inductor for a few cases), no recompiles across batch
sizes, ``torch.export`` with a dynamic batch dim, AOTInductor, no host syncs, and a compiled
training step whose gradients match eager.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch import nn
from torch._dynamo.testing import CompileCounter

import fastgen
from fastgen import (
    ParamConverter,
    RFForward,
    SampleTimestepConfig,
    TimestepSampler,
    add_noise,
    convert_prediction,
    dsm_loss,
    expand_like,
    make_t_list,
    pred_noise_to_pred_x0,
    pred_x0_from_flow,
    rf_alpha,
    rf_sigma,
    sample_from_t_list,
    sample_timesteps,
    vsd_loss,
    x0_to_eps,
    x0_to_flow,
)

PAIRS = [(s, d) for s in ("x0", "eps", "flow") for d in ("x0", "eps", "flow")]
KINDS = ["uniform", "logitnormal", "lognormal", "shifted", "polynomial", "mode", "cosmap"]


def data(b=8, dtype=torch.float32):
    return torch.randn(b, 4, 6, dtype=dtype), torch.randn(b, 4, 6, dtype=dtype), torch.rand(b)


def _convert(s, d):
    def fn(pred, x_t, t):
        return convert_prediction(pred, x_t, t, src=s, dst=d)

    fn.__name__ = f"convert_{s}_to_{d}"
    return fn


def _dsm(pred_type):
    def fn(pred, x0, eps, t):
        return dsm_loss(pred, x0=x0, eps=eps, t=t, pred_type=pred_type)

    fn.__name__ = f"dsm_{pred_type}"
    return fn


# (callable, args maker): every deterministic public callable
DETERMINISTIC = [
    (add_noise, lambda: data()),
    (pred_noise_to_pred_x0, lambda: data()),
    (pred_x0_from_flow, lambda: data()),
    (x0_to_eps, lambda: data()),
    (x0_to_flow, lambda: data()),
    (rf_alpha, lambda: (torch.rand(8),)),
    (rf_sigma, lambda: (torch.rand(8),)),
    (expand_like, lambda: (torch.rand(8, 1, 3), torch.zeros(8, 2, 3, 4))),
    *[(_convert(s, d), lambda: data()) for s, d in PAIRS],
    *[(_dsm(p), lambda: (torch.randn(8, 4, 6), *data())) for p in ("x0", "eps", "flow")],
    (vsd_loss, lambda: (*data()[:2], torch.randn(8, 4, 6))),
    (RFForward(), lambda: data()),
    *[(ParamConverter(s, d), lambda: data()) for s, d in PAIRS],
]
IDS = [getattr(fn, "__name__", None) or repr(fn) for fn, _ in DETERMINISTIC]


def one_frame(fn, args, backend="eager", dynamic=None):
    counter = CompileCounter() if backend == "counter" else None
    compiled = torch.compile(fn, backend=counter or backend, fullgraph=True, dynamic=dynamic)
    out = compiled(*args)
    return out, counter


@pytest.mark.parametrize(("fn", "make"), DETERMINISTIC, ids=IDS)
def test_one_frame_and_bitwise_equal_to_eager(fn, make):
    torch._dynamo.reset()
    args = make()
    expected = fn(*args)
    _, counter = one_frame(fn, args, backend="counter")
    assert counter.frame_count == 1 and counter.op_count > 0
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        out, _ = one_frame(fn, args, backend=backend)
        assert torch.equal(out, expected), backend


def _draw_timesteps(cfg):
    return lambda n: sample_timesteps(n, cfg, device="cpu")


_LADDER = make_t_list(4, shift=5.0)
_SAMPLER = TimestepSampler(
    SampleTimestepConfig(time_dist_type="logitnormal", t_list=[0.9, 0.4, 0.0])
)

# configs and modules are built outside the compiled region, as in a training loop
SAMPLERS = [
    *[
        _draw_timesteps(SampleTimestepConfig(time_dist_type=k, stratified=s))
        for k in KINDS
        for s in (False, True)
    ],
    lambda n: sample_from_t_list(n, _LADDER, device="cpu", return_index=True),
    lambda n: _SAMPLER(torch.zeros(n, 2)),
    lambda n: _SAMPLER.sample_t_list(torch.zeros(n, 2)),
]
SAMPLER_IDS = [f"{k}-{'strat' if s else 'iid'}" for k in KINDS for s in (False, True)] + [
    "t_list",
    "TimestepSampler",
    "TimestepSampler.sample_t_list",
]


@pytest.mark.parametrize("draw", SAMPLERS, ids=SAMPLER_IDS)
def test_samplers_one_frame_and_same_stream_as_eager(draw):
    torch._dynamo.reset()
    torch.manual_seed(1)
    expected = draw(64)
    counter = CompileCounter()
    compiled = torch.compile(draw, backend=counter, fullgraph=True)
    torch.manual_seed(1)
    out = compiled(64)
    assert counter.frame_count == 1
    # the eager backend consumes the default generator exactly as eager does
    for a, b in zip(
        out if isinstance(out, tuple) else (out,),
        expected if isinstance(expected, tuple) else (expected,),
    ):
        assert torch.equal(a, b)


def test_generator_under_compile_raises():
    torch._dynamo.reset()
    cfg, generator = SampleTimestepConfig(), torch.Generator()
    fn = torch.compile(
        lambda: sample_timesteps(4, cfg, device="cpu", generator=generator),
        backend="eager",
        fullgraph=True,
    )
    with pytest.raises(Exception, match="generator"):
        fn()


def test_value_checks_are_skipped_under_compile():
    # t outside [0, 1] raises in eager, but compiled code must not sync to look.
    torch._dynamo.reset()
    x, e, _ = data()
    bad_t = torch.full((8,), 1.5)
    with pytest.raises(ValueError):
        add_noise(x, e, bad_t)
    out, counter = one_frame(add_noise, (x, e, bad_t), backend="counter")
    assert counter.frame_count == 1 and out.shape == x.shape


class Wrap(nn.Module):
    """A small module calling one public callable, for export."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def batched(make, b):
    """The callable's example arguments with batch size b (every tensor's leading dim)."""
    torch.manual_seed(b)
    return tuple(torch.randn(b, *a.shape[1:], dtype=a.dtype).abs().clamp(max=1) for a in make())


@pytest.mark.parametrize(("fn", "make"), DETERMINISTIC, ids=IDS)
def test_no_recompile_across_batch_sizes_each_callable(fn, make):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    # batch sizes that equal no other dim, or duck sizing would tie them together
    for b in (5, 7, 9, 17):
        args = batched(make, b)
        assert torch.equal(compiled(*args), fn(*args))
    assert counter.frame_count == 1


@pytest.mark.parametrize(("fn", "make"), DETERMINISTIC, ids=IDS)
def test_export_each_callable_with_dynamic_batch(fn, make):
    args = batched(make, 5)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        Wrap(fn), args, dynamic_shapes=(tuple({0: batch} for _ in args),)
    )
    for b in (2, 9):
        new = batched(make, b)
        assert torch.equal(exported.module()(*new), fn(*new))


# --- inductor: a few cases, bitwise ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_inductor_bitwise_equal(dtype):
    torch._dynamo.reset()
    x0, eps, t = data(32, dtype)
    flow = torch.randn_like(x0)  # an input: a bf16 op in user code would be rounded differently

    def step(x0, eps, flow, t):
        # every public function, in one graph (one inductor compile per dtype)
        x_t = add_noise(x0, eps, t)
        outs = [x_t, rf_alpha(t), rf_sigma(t), expand_like(t, x0)]
        outs += [
            f(flow, x_t, t)
            for f in (pred_noise_to_pred_x0, pred_x0_from_flow, x0_to_eps, x0_to_flow)
        ]
        outs += [convert_prediction(flow, x_t, t, src=s, dst=d) for s, d in PAIRS]
        return outs  # (the losses reduce: inductor may sum in another order, so not bitwise)

    compiled = torch.compile(step, fullgraph=True)
    for a, b in zip(compiled(x0, eps, flow, t), step(x0, eps, flow, t)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_inductor_sampler_matches_eager_with_fallback_random():
    torch._dynamo.reset()
    cfg = SampleTimestepConfig(time_dist_type="logitnormal", stratified=True)

    def draw(n):
        return sample_timesteps(n, cfg, device="cpu", dtype=torch.bfloat16)

    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(draw, fullgraph=True)
        torch.manual_seed(5)
        out = compiled(4096)
    torch.manual_seed(5)
    assert torch.equal(out, draw(4096))
    wide = out.double()
    assert bool((wide >= cfg.min_t).all()) and bool((wide <= cfg.max_t).all())


# --- a model using all three modules ---------------------------------------------------------


class Denoiser(nn.Module):
    """A tiny flow-predicting network trained in x0 space: sample t, noise, predict, convert."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.sampler = TimestepSampler(SampleTimestepConfig(time_dist_type="logitnormal"))
        self.forward_process = RFForward()
        self.to_x0 = ParamConverter("flow", "x0")
        self.net = nn.Sequential(nn.Linear(dim + 1, 32), nn.SiLU(), nn.Linear(32, dim))

    def forward(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = self.sampler(x0)
        x_t = self.forward_process(x0, eps, t)
        flow = self.net(torch.cat([x_t, t[:, None]], dim=1))
        return self.to_x0(flow, x_t, t)


class DenoiserGivenT(Denoiser):
    def forward(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = self.forward_process(x0, eps, t)
        flow = self.net(torch.cat([x_t, t[:, None]], dim=1))
        return self.to_x0(flow, x_t, t)


def test_no_recompiles_across_batch_sizes():
    torch._dynamo.reset()
    model = Denoiser()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiled(torch.randn(2, 6), torch.randn(2, 6))
    torch.compiler.set_stance("fail_on_recompile")
    for b in range(2, 65):
        torch.manual_seed(b)
        out = compiled(torch.randn(b, 6), torch.randn(b, 6))
        assert out.shape == (b, 6)
    torch.compiler.set_stance("default")
    assert counter.frame_count == 1


def test_batch_size_one_is_specialised_unless_marked_unbacked():
    # Dynamo specialises size-1 dims; mark_unbacked keeps batch 1 in the same graph.
    torch._dynamo.reset()
    model = DenoiserGivenT()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiled(torch.randn(4, 6), torch.randn(4, 6), torch.rand(4))
    compiled(torch.randn(1, 6), torch.randn(1, 6), torch.rand(1))
    assert counter.frame_count == 2
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for b in (4, 1, 9):
        args = (torch.randn(b, 6), torch.randn(b, 6), torch.rand(b))
        for a in args:
            torch._dynamo.decorators.mark_unbacked(a, 0)
        compiled(*args)
    assert counter.frame_count == 1


def test_export_dynamic_batch_and_save_load(tmp_path):
    model = Denoiser().eval()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        model, (torch.randn(4, 6), torch.randn(4, 6)), dynamic_shapes=({0: batch}, {0: batch})
    )
    path = tmp_path / "denoiser.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path).module()
    graph_ops = {str(n.target) for n in exported.graph.nodes}
    assert any("rand" in op for op in graph_ops)  # sampling is inside the exported graph
    for b in (2, 7, 33):
        x0, eps = torch.randn(b, 6), torch.randn(b, 6)
        torch.manual_seed(b)
        expected = model(x0, eps)
        for module in (exported.module(), loaded):
            torch.manual_seed(b)
            assert torch.equal(module(x0, eps), expected)


@pytest.mark.slow
def test_aoti_compile_and_package(tmp_path):
    model = DenoiserGivenT().eval()
    batch = torch.export.Dim("batch", min=2, max=1024)
    args = (torch.randn(4, 6), torch.randn(4, 6), torch.rand(4))
    exported = torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for b in (3, 50):
        inputs = (torch.randn(b, 6), torch.randn(b, 6), torch.rand(b))
        torch.testing.assert_close(runner(*inputs), model(*inputs), rtol=1e-6, atol=1e-6)


# --- no host syncs ---------------------------------------------------------------------------


def test_hot_paths_never_sync(sync_counter):
    fastgen.set_value_checks(False)
    model = Denoiser()
    sampler = TimestepSampler(
        SampleTimestepConfig(time_dist_type="mode", t_list=make_t_list(4, shift=5.0))
    )
    x0, eps, _ = data()
    with sync_counter() as counter:
        for kind in KINDS:
            for stratified in (False, True):
                sample_timesteps(
                    64,
                    SampleTimestepConfig(time_dist_type=kind, stratified=stratified),
                    device="cpu",
                    dtype=torch.bfloat16,
                )
        t, k = sampler.sample_t_list(x0)
        t_next = sampler.t_list[k + 1]
        x_t = add_noise(x0, eps, t)
        x_next = add_noise(x_t, x0_to_eps(x_t, x_t, t), t_next)
        loss = dsm_loss(model(x0[:, 0], eps[:, 0]), x0=x0[:, 0], eps=eps[:, 0], t=t, pred_type="x0")
        loss = loss + vsd_loss(x_next, x0, eps)
        loss.backward()
    assert counter.syncs == []


def test_compiled_graph_has_no_sync_ops():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    fn = torch.compile(Denoiser(), backend=backend, fullgraph=True)
    fn(torch.randn(8, 6), torch.randn(8, 6))
    assert len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    methods = {n.target for n in nodes if n.op == "call_method"}
    functions = {
        getattr(n.target, "__name__", str(n.target)) for n in nodes if n.op == "call_function"
    }
    assert not methods & {"item", "tolist", "nonzero", "numpy", "cpu"}
    assert not functions & {"nonzero", "masked_select", "_local_scalar_dense", "unique"}
    assert "rand" in functions  # the sampler's draw is in the graph


# --- a compiled training step ----------------------------------------------------------------


def test_compiled_training_step_one_frame_and_same_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Denoiser()
    reference = Denoiser()
    reference.load_state_dict(model.state_dict())

    def step(net, x0):
        eps = torch.randn_like(x0)
        t = net.sampler(x0)
        x_t = net.forward_process(x0, eps, t)
        flow = net.net(torch.cat([x_t, t[:, None]], dim=1))
        return dsm_loss(flow, x0=x0, eps=eps, t=t, pred_type="flow")

    x0 = torch.randn(16, 6)
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    torch.manual_seed(3)
    compiled(model, x0).backward()
    torch.manual_seed(3)
    step(reference, x0).backward()
    assert counter.frame_count == 1
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    torch._dynamo.reset()
    model.zero_grad()
    torch.manual_seed(3)
    torch.compile(step, backend="aot_eager", fullgraph=True)(model, x0).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


# --- the DMD2 helpers ---------------------------------------------------------------------------


class GuidedGAN(nn.Module):
    """CFG of two predictions, then the three GAN losses on logits made from them."""

    def forward(self, cond, uncond, real_logits):
        guided = fastgen.classifier_free_guidance(cond, uncond, 3.0)
        fake_logits = guided.mean(dim=(2, 3))[:, :2]
        return (
            guided,
            fastgen.gan_gen_loss(fake_logits),
            fastgen.gan_disc_loss(real_logits, fake_logits),
            fastgen.r1_loss(real_logits, fake_logits),
        )


def test_dmd_helpers_compile_in_one_frame_and_export_with_a_dynamic_batch():
    model = GuidedGAN()
    args = (torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.randn(5, 2))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for b in (5, 7, 9):
        new = (torch.randn(b, 3, 4, 4), torch.randn(b, 3, 4, 4), torch.randn(b, 2))
        for got, want in zip(compiled(*new), model(*new)):
            assert torch.equal(got, want)
    assert counter.frame_count == 1
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    new = (torch.randn(11, 3, 4, 4), torch.randn(11, 3, 4, 4), torch.randn(11, 2))
    for got, want in zip(program.module()(*new), model(*new)):
        assert torch.equal(got, want)
