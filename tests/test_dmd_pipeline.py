"""DMDPipeline: one graph per loss with the networks inside, no host sync, gradient routing,
float64 references, per-sample backward simulation, the timestep convention, and bad input."""

from __future__ import annotations

import copy
import math

import pydantic
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode
from toys import ToyDiT, ToyTokenDiscriminator, toy_batch

import fastgen
import fastgen.dmd.pipeline
from fastgen import DMDConfig, DMDPipeline, EMAConfig, make_t_list

LADDER = make_t_list(4, shift=5.0)
BATCHES = (5, 7, 11)  # not 4: a batch equal to the channel count would share its symbol


def config(**kwargs):
    return DMDConfig(**kwargs)


def multistep(**kwargs):
    return DMDConfig(
        student_sample_steps=4,
        sample_t_cfg={"time_dist_type": "shifted", "t_list": LADDER},
        **kwargs,
    )


def pipeline(cfg: DMDConfig, gan: bool = False, seed: int = 0) -> DMDPipeline:
    torch.manual_seed(seed)
    teacher = ToyDiT()
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():
        for net in (student, fake):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    disc = None
    if gan:
        fastgen.attach_feature_capture(teacher, [0, 1], blocks="transformer_blocks")
        disc = ToyTokenDiscriminator()
    return DMDPipeline(student, teacher, fastgen.create_fake_score(fake), cfg, discriminator=disc)


CONFIGS = {
    "1step": lambda: config(),
    "1step-cfg": lambda: config(guidance_scale=3.0),
    "4step-real": lambda: multistep(guidance_scale=2.0),
    "4step-backsim-ode": lambda: multistep(guidance_scale=2.0, backward_simulation=True),
    "4step-backsim-sde": lambda: multistep(backward_simulation=True, student_sample_type="sde"),
    "4step-backsim-stratified": lambda: multistep(
        guidance_scale=2.0, backward_simulation=True, rung_sampling="stratified"
    ),
    "gan-r1": lambda: config(guidance_scale=2.0, gan_loss_weight_gen=0.03, gan_r1_reg_weight=10.0),
}


def losses_of(pipe: DMDPipeline):
    """(name, callable(batch) -> dict) for each loss the config has."""
    out = [
        (
            "student",
            lambda lat, noise, cond, neg: pipe.compute_student_loss(
                lat, noise, cond, negative_encoder_hidden_states=neg
            ),
        ),
        (
            "fake_score",
            lambda lat, noise, cond, neg: pipe.compute_fake_score_loss(lat, noise, cond),
        ),
    ]
    if pipe.discriminator is not None:
        out.append(
            (
                "discriminator",
                lambda lat, noise, cond, neg: pipe.compute_discriminator_loss(lat, noise, cond),
            )
        )
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_loss_is_one_graph_for_every_batch(name):
    pipe = pipeline(CONFIGS[name](), gan=name.startswith("gan"))
    for loss_name, fn in losses_of(pipe):
        counter = CompileCounter()
        compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
        for i, b in enumerate(BATCHES):
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            out = compiled(*toy_batch(b))
            out["total"].backward()
        torch.compiler.set_stance("default")
        assert counter.frame_count == 1, (loss_name, counter.frame_count)


@pytest.mark.slow
def test_inductor_4step_backsim_matches_eager():
    import torch._inductor.config as inductor_config

    outs = []
    for compiled in (False, True):
        pipe = pipeline(multistep(guidance_scale=2.0, backward_simulation=True))
        fn = pipe.compute_student_loss
        if compiled:
            fn = torch.compile(fn, fullgraph=True)
        torch.manual_seed(7)
        lat, noise, cond, neg = toy_batch(5)
        with inductor_config.patch(fallback_random=True):
            outs.append(fn(lat, noise, cond, negative_encoder_hidden_states=neg)["vsd"].detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-7)


SYNC_TARGETS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "_unique2", "is_nonzero"}


def pin_draws(monkeypatch, pipes, draws):
    """Each pipeline's timesteps and every ``torch.randn_like`` come from ``draws`` (refilled by
    the caller before each call)."""
    for pipe in pipes:
        monkeypatch.setattr(pipe, "sample_timesteps", lambda n, **kw: draws["times"].pop(0))
    monkeypatch.setattr(
        torch, "randn_like", lambda x, **kw: draws["noises"].pop(0).to(kw.get("dtype") or x.dtype)
    )


def fresh_draws(draws, seed):
    g = torch.Generator().manual_seed(seed)
    draws["times"] = [torch.rand(5, generator=g) for _ in range(6)]
    draws["noises"] = [torch.randn(5, 4, 8, 8, generator=g) for _ in range(9)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_host_sync_and_aot_eager_equals_eager(name, sync_counter, monkeypatch):
    """Eager (value checks off): no sync op dispatched. Compiled (aot_eager): none in the aten
    graphs, the noise drawn in the graph, and the eager loss and student gradients from the same
    seed. Under aot_eager the discriminator loss consumes the global RNG in another order than
    eager, so the GAN config's draws are pinned (the same for both) instead."""
    from torch._dynamo.backends.common import aot_autograd

    fastgen.set_value_checks(False)
    gan = name.startswith("gan")
    eager, compiled = pipeline(CONFIGS[name](), gan=gan), pipeline(CONFIGS[name](), gan=gan)
    draws = {}
    if gan:
        pin_draws(monkeypatch, (eager, compiled), draws)
    for i, ((loss_name, fn_e), (_, fn)) in enumerate(zip(losses_of(eager), losses_of(compiled))):
        for p in [*eager.student.parameters(), *compiled.student.parameters()]:
            p.grad = None
        if gan:
            fresh_draws(draws, i)
        with sync_counter() as counter:
            torch.manual_seed(123)
            out_e = fn_e(*toy_batch(5))
            out_e["total"].backward()
        assert counter.syncs == [], (loss_name, counter.syncs)
        graphs = []

        def record(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm

        fn = torch.compile(
            fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True
        )
        if gan:
            fresh_draws(draws, i)
        torch.manual_seed(123)
        out = fn(*toy_batch(5))
        out["total"].backward()
        assert len(graphs) == 2  # forward and backward
        ops = {
            getattr(n.target, "__name__", str(n.target)).split(".")[0]
            for g in graphs
            for n in g.graph.nodes
            if n.op == "call_function"
        }
        assert not ops & SYNC_TARGETS, (loss_name, ops & SYNC_TARGETS)
        assert gan or "randn_like" in ops or "randn" in ops  # the draws are in the graph
        for key in out_e:
            torch.testing.assert_close(out[key], out_e[key], rtol=1e-6, atol=1e-8)
        for a, c in zip(eager.student.parameters(), compiled.student.parameters()):
            assert (a.grad is None) == (c.grad is None), loss_name
            if a.grad is not None:
                torch.testing.assert_close(c.grad, a.grad, rtol=1e-5, atol=1e-8)


def grads(net: nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters()]


def test_gradient_routing():
    pipe = pipeline(CONFIGS["gan-r1"](), gan=True)
    nets = {
        "student": pipe.student,
        "teacher": pipe.teacher,
        "fake_score": pipe.fake_score,
        "discriminator": pipe.discriminator,
    }
    expected = {
        "student": {"student"},
        "fake_score": {"fake_score"},
        "discriminator": {"discriminator"},
    }
    for loss_name, fn in losses_of(pipe):
        for net in nets.values():
            net.zero_grad(set_to_none=True)
        fn(*toy_batch(5))["total"].backward()
        got = {name for name, net in nets.items() if any(grads(net))}
        assert got == expected[loss_name], (loss_name, got)
        assert all(p.grad is None for p in pipe.teacher.parameters())


def test_gan_gradient_reaches_the_student_through_teacher_features():
    pipe = pipeline(config(gan_loss_weight_gen=1.0), gan=True)
    torch.manual_seed(0)
    out = pipe.compute_student_loss(*toy_batch(5)[:3])
    (g_gan,) = torch.autograd.grad(out["gan_gen"], [pipe.student.proj_out.weight])
    assert g_gan.abs().sum() > 0


def pinned(monkeypatch, pipe, t, eps):
    monkeypatch.setattr(pipe, "sample_timesteps", lambda n, **kw: t)
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: eps.to(kw.get("dtype") or x.dtype))


def flow(net, x, t, cond):
    return net(hidden_states=x, timestep=t, encoder_hidden_states=cond).sample


def test_one_step_cfg_student_loss_equals_float64_reference(monkeypatch):
    scale = 3.0
    pipe = pipeline(config(guidance_scale=scale))
    lat, noise, cond, neg = toy_batch(5)
    t, eps = torch.rand(5) * 0.9 + 0.05, torch.randn(5, 4, 8, 8)
    pinned(monkeypatch, pipe, t, eps)
    out = pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)
    # reference: the formulas in float64, the networks on the same float32 inputs
    with torch.no_grad():
        d = torch.float64
        t_s = torch.full((5,), 0.999)
        x_s = (noise.double() * 0.999).float()
        t4 = t.double()[:, None, None, None]
        gen = x_s.double() - 0.999 * flow(pipe.student, x_s, t_s, cond).double()
        x_t = ((1 - t4) * gen.float().double() + t4 * eps.double()).float()
        x0 = {
            name: x_t.double() - t4 * flow(net, x_t, t, c).to(d)
            for name, net, c in (
                ("fake", pipe.fake_score, cond),
                ("cond", pipe.teacher, cond),
                ("uncond", pipe.teacher, neg),
            )
        }
        teacher = x0["cond"] + (scale - 1) * (x0["cond"] - x0["uncond"])
        g = gen.float().double()
        w = 1 / ((g - teacher).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
        grad = (x0["fake"] - teacher) * w
        expected = 0.5 * (grad**2).mean()
    assert out["vsd"].dtype == torch.float32
    torch.testing.assert_close(out["vsd"].double(), expected, rtol=2e-7, atol=0)


def test_fake_score_loss_equals_float64_reference(monkeypatch):
    pipe = pipeline(multistep(fake_score_pred_type="eps"))
    lat, noise, cond, _ = toy_batch(5)
    t, eps = torch.rand(5) * 0.9 + 0.05, torch.randn(5, 4, 8, 8)
    pinned(monkeypatch, pipe, t, eps)
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, **kw: torch.full(size, 2))
    out = pipe.compute_fake_score_loss(lat, noise, cond)
    with torch.no_grad():
        t_k = torch.full((5,), LADDER[2])
        x_s = ((1 - LADDER[2]) * lat.double() + LADDER[2] * noise.double()).float()
        gen = (x_s.double() - LADDER[2] * flow(pipe.student, x_s, t_k, cond).double()).float()
        t4 = t.double()[:, None, None, None]
        x_t = ((1 - t4) * gen.double() + t4 * eps.double()).float()
        v = flow(pipe.fake_score, x_t, t, cond).double()
        eps_hat = x_t.double() + (1 - t4) * v  # flow -> eps, division free
        expected = ((eps_hat - eps.double()) ** 2).mean()
    torch.testing.assert_close(out["fake_score"].double(), expected, rtol=1e-6, atol=0)


def test_v_is_flow():
    results = []
    for pred in ("v", "flow"):
        pipe = pipeline(config(pred_type=pred, fake_score_pred_type=None))
        torch.manual_seed(5)
        batch = toy_batch(5)
        results.append(
            (pipe.compute_student_loss(*batch[:3]), pipe.compute_fake_score_loss(*batch[:3]))
        )
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a["total"], b["total"])


@pytest.mark.parametrize("steps_type", ["ode", "sde"])
def test_backward_simulation_gives_each_sample_the_input_of_its_own_rung(monkeypatch, steps_type):
    """A batch of mixed rungs equals, sample by sample, the same batch run at one shared rung."""
    pipe = pipeline(multistep(backward_simulation=True, student_sample_type=steps_type))
    lat, noise, cond, _ = toy_batch(5)
    draws = [torch.randn_like(lat) for _ in range(3)]

    def run(rungs):
        queue = list(draws)
        with monkeypatch.context() as m:
            m.setattr(torch, "randint", lambda lo, hi, size, **kw: torch.tensor(rungs))
            m.setattr(
                torch, "randn_like", lambda x, **kw: queue.pop(0).to(kw.get("dtype") or x.dtype)
            )
            return pipe.student_input(lat, noise, cond)

    mixed = [0, 3, 1, 2, 3]
    x_mixed, t_mixed = run(mixed)
    for i, k in enumerate(mixed):
        x_k, t_k = run([k] * 5)
        assert torch.equal(x_mixed[i], x_k[i]) and torch.equal(t_mixed[i], t_k[i])
    x0_rung0, _ = run([0] * 5)
    assert torch.equal(x0_rung0, (noise.double() * LADDER[0]).float())  # pure noise at rung 0


class Recorder(nn.Module):
    """Records the timestep it is given; predicts zero flow."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        self.seen.append(timestep)
        return hidden_states * self.w


@pytest.mark.parametrize(
    ("option", "dtype", "value"),
    [("float32", torch.float32, 750.0), ("latents", torch.bfloat16, 752.0)],
)
def test_num_train_timesteps(monkeypatch, option, dtype, value):
    nets = [Recorder() for _ in range(3)]
    cfg = config(num_train_timesteps=1000, timestep_dtype=option)
    pipe = DMDPipeline(*nets, cfg)
    monkeypatch.setattr(pipe, "sample_timesteps", lambda n, **kw: torch.full((n,), 0.75))
    lat = torch.randn(3, 2, 4, dtype=torch.bfloat16)
    pipe.compute_student_loss(lat, torch.randn_like(lat))
    student_t, fake_t = nets[0].seen[0], nets[2].seen[0]
    assert student_t.dtype == dtype and float(student_t[0]) == float(
        torch.tensor(999.0, dtype=dtype)
    )
    assert fake_t.dtype == dtype and float(fake_t[0]) == value


def test_negative_model_kwargs_reach_only_the_unconditional_call():
    seen = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(
            self,
            hidden_states,
            timestep,
            encoder_hidden_states=None,
            pooled=None,
            txt_seq_lens=None,
        ):
            seen.append((pooled, txt_seq_lens))
            return hidden_states * self.w

    pipe = DMDPipeline(Net(), Net(), Net(), config(guidance_scale=2.0))
    lat = torch.randn(3, 2, 2)
    pipe.compute_student_loss(
        lat, torch.randn_like(lat), torch.ones(3, 1, 2),
        negative_encoder_hidden_states=torch.zeros(3, 1, 2),
        negative_model_kwargs={"pooled": "neg"}, pooled="pos", txt_seq_lens=[1],
    )  # fmt: skip
    assert seen[:3] == [("pos", [1])] * 3 and seen[3] == ("neg", None)


def test_ema_via_pipeline_counts_iterations():
    pipe = pipeline(config(ema=EMAConfig(type="power", gamma=1.0)))
    before = {k: v.clone() for k, v in pipe.ema.state_dict().items()}
    pipe.update_ema()  # iteration 1: copies
    with torch.no_grad():
        for p in pipe.student.parameters():
            p.add_(1.0)
    pipe.update_ema()  # iteration 2: beta = (1 - 1/2)^2 = 0.25
    w = pipe.student.proj_out.weight
    torch.testing.assert_close(pipe.ema.state_dict()["proj_out.weight"], w - 0.25)
    assert not torch.equal(before["proj_out.weight"], pipe.ema.state_dict()["proj_out.weight"])
    with torch.no_grad():
        for p in pipe.student.parameters():
            p.add_(1.0)
    pipe.update_ema(iteration=4)  # an explicit number: beta = (1 - 1/4)^2 = 0.5625
    # beta (w - 1 - 0.25) + (1 - beta) w = w - 1.25 beta, w the live weight
    torch.testing.assert_close(pipe.ema.state_dict()["proj_out.weight"], w - 1.25 * 0.5625)


def test_properties_and_teacher_frozen():
    pipe = pipeline(config())
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert not pipe.teacher.training and not any(p.requires_grad for p in pipe.teacher.parameters())
    assert pipe.ema is None
    t = pipe.sample_timesteps(1000)
    assert t.dtype == torch.float32 and float(t.min()) >= 0.001 and float(t.max()) <= 0.999


def test_meta_tensors_flow_through_the_primitives():
    x = torch.randn(2, 3, device="meta")
    assert fastgen.add_noise(x, x, torch.rand(2, device="meta")).is_meta
    assert fastgen.x0_to_eps(x, x, torch.rand(2, device="meta")).shape == (2, 3)


def _bad_inputs():
    lat, noise, cond, neg = toy_batch(5)
    pipe = pipeline(config(guidance_scale=2.0))
    plain = pipeline(config())

    class NoTensor(nn.Module):
        def forward(self, **kwargs):
            return {"x": kwargs["hidden_states"]}

    class WrongShape(nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states[:, :2]

    t_list = {"time_dist_type": "shifted", "t_list": LADDER}
    return [
        # configs
        ("student_sample_steps", lambda: DMDConfig(student_sample_steps=0), pydantic.ValidationError),
        ("pred_type", lambda: DMDConfig(pred_type="score"), pydantic.ValidationError),
        ("gan_r1_reg_weight", lambda: DMDConfig(gan_r1_reg_weight=1.0), pydantic.ValidationError),
        ("backward_simulation", lambda: DMDConfig(backward_simulation=True), pydantic.ValidationError),
        ("needs sample_t_cfg.t_list", lambda: DMDConfig(student_sample_steps=2), pydantic.ValidationError),
        ("t_list has 5 entries", lambda: DMDConfig(student_sample_steps=2, sample_t_cfg=t_list), pydantic.ValidationError),
        ("guidance_scale", lambda: DMDConfig(guidance_scale=float("inf")), pydantic.ValidationError),
        ("gudiance_scale", lambda: DMDConfig(gudiance_scale=2.0), pydantic.ValidationError),
        ("decay", lambda: EMAConfig(decay=1.5), pydantic.ValidationError),
        ("mode", lambda: EMAConfig(mode="sharded"), pydantic.ValidationError),
        ("p_mean", lambda: fastgen.SampleTimestepConfig(p_mean=0.0, train_p_mean=1.0), pydantic.ValidationError),
        ("num_train_timesteps", lambda: DMDConfig(num_train_timesteps=0), pydantic.ValidationError),
        # the pipeline
        ("config must be a DMDConfig", lambda: DMDPipeline(*[nn.Linear(1, 1)] * 3, {}), TypeError),
        ("student must be an nn.Module", lambda: DMDPipeline(lambda x: x, nn.Linear(1, 1), nn.Linear(1, 1), DMDConfig()), TypeError),
        ("needs a discriminator", lambda: DMDPipeline(*[nn.Linear(1, 1)] * 3, DMDConfig(gan_loss_weight_gen=0.1)), ValueError),
        ("attach a capture", lambda: DMDPipeline(*[nn.Linear(1, 1)] * 3, DMDConfig(), discriminator=nn.Linear(1, 1)), ValueError),
        ("needs negative_encoder_hidden_states", lambda: pipe.compute_student_loss(lat, noise, cond), ValueError),
        ("guidance_scale must be a finite float", lambda: plain.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg, guidance_scale=float("nan")), TypeError),
        ("latents and noise must have the same shape", lambda: plain.compute_student_loss(lat, noise[:3], cond), ValueError),
        ("latents must be a floating-point", lambda: plain.compute_fake_score_loss(lat.long(), noise), TypeError),
        ("noise must be a torch.Tensor", lambda: plain.compute_fake_score_loss(lat, noise.numpy()), TypeError),
        ("timestep is set by the pipeline", lambda: plain.compute_student_loss(lat, noise, cond, timestep=1), TypeError),
        ("the student returned dict", lambda: DMDPipeline(NoTensor(), NoTensor(), NoTensor(), DMDConfig()).compute_student_loss(lat, noise), TypeError),
        ("student output and hidden_states must have the same shape", lambda: DMDPipeline(WrongShape(), WrongShape(), WrongShape(), DMDConfig()).compute_student_loss(lat, noise), ValueError),
        ("needs a discriminator", lambda: plain.compute_discriminator_loss(lat, noise, cond), ValueError),
        ("no recipe file", lambda: fastgen.load_dmd_config("dmd2_does_not_exist"), FileNotFoundError),
        ("cannot copy an FSDP-wrapped", lambda: fastgen.create_fake_score(_FakeSharded()), ValueError),
        ("t is on meta but the data is on cpu", lambda: fastgen.add_noise(lat, noise, torch.rand(5, device="meta")), ValueError),
        ("iteration must be an int", lambda: fastgen.ExponentialMovingAverage(nn.Linear(1, 1), EMAConfig()).update(nn.Linear(1, 1), iteration=-1), ValueError),
    ]  # fmt: skip


class _FakeSharded(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(1, 1)
        self.inner._fsdp_wrapped_module = nn.Identity()


BAD = _bad_inputs()


@pytest.mark.parametrize(("words", "call", "error"), BAD, ids=[w for w, _, _ in BAD])
def test_bad_input_is_a_clear_error(words, call, error):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_bad_input_table_is_large_enough():
    assert len(BAD) >= 20


# --- guidance_batching="batched": one teacher call of batch 2B --------------------------------


@pytest.mark.parametrize("steps", [1, 4])
def test_batched_guidance_equals_separate_calls_with_one_teacher_call(monkeypatch, steps):
    results, calls = [], []
    for batching in ("separate", "batched"):
        make = config if steps == 1 else multistep
        cfg = make(guidance_scale=3.0, guidance_batching=batching)
        pipe = pipeline(cfg)
        handle = pipe.teacher.register_forward_hook(
            lambda m, args, kwargs, out, tag=batching: calls.append(
                (tag, kwargs["hidden_states"].shape[0])
            ),
            with_kwargs=True,
        )
        lat, noise, cond, neg = toy_batch(5)
        pinned(monkeypatch, pipe, torch.rand(5) * 0.9 + 0.05, torch.randn(5, 4, 8, 8))
        torch.manual_seed(3)  # the same unrolled sample in both (4 steps)
        results.append(
            pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)["vsd"]
        )
        handle.remove()
        monkeypatch.undo()  # the next pipeline's construction draws with the real randn_like
    assert [c for c in calls if c[0] == "separate"] == [("separate", 5)] * 2
    assert [c for c in calls if c[0] == "batched"] == [("batched", 10)]
    # the same loss up to the network's batch-size-dependent float32 rounding
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=0)


def test_batched_guidance_is_one_graph_for_every_batch():
    pipe = pipeline(config(guidance_scale=3.0, guidance_batching="batched"))
    counter = CompileCounter()
    fn = torch.compile(
        lambda lat, noise, cond, neg: pipe.compute_student_loss(
            lat, noise, cond, negative_encoder_hidden_states=neg
        ),
        backend=counter,
        fullgraph=True,
        dynamic=True,
    )
    for b in BATCHES:
        fn(*toy_batch(b))["total"].backward()
    assert counter.frame_count == 1


def test_batched_guidance_rejects_what_it_cannot_batch():
    pipe = pipeline(config(guidance_scale=3.0, guidance_batching="batched"))
    lat, noise, cond, neg = toy_batch(5)
    with pytest.raises(ValueError, match="one shape, got \\(5, 3, 8\\) and \\(5, 2, 8\\)"):
        pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg[:, :2])
    with pytest.raises(ValueError, match="'return_dict' differs"):
        pipe.compute_student_loss(
            lat, noise, cond, negative_encoder_hidden_states=neg,
            negative_model_kwargs={"return_dict": False}, return_dict=True,
        )  # fmt: skip
    with pytest.raises(pydantic.ValidationError, match="cannot run with the GAN branch"):
        config(guidance_scale=3.0, guidance_batching="batched", gan_loss_weight_gen=0.1)


@pytest.mark.parametrize("weight", [0.5, 10.0])
def test_discriminator_total_adds_the_weighted_r1_term(weight):
    pipe = pipeline(config(gan_loss_weight_gen=0.03, gan_r1_reg_weight=weight), gan=True)
    torch.manual_seed(0)
    out = pipe.compute_discriminator_loss(*toy_batch(5)[:3])
    assert set(out) == {"gan_disc", "r1", "total"}
    want = out["gan_disc"].double() + weight * out["r1"].double()
    assert torch.equal(out["total"], want.to(out["total"].dtype))
    assert out["r1"] > 0


def test_discriminator_loss_calls_the_student_with_the_conditioning():
    # backward simulation: the unroll to the drawn rung and the sample both see it
    pipe = pipeline(multistep(backward_simulation=True, gan_loss_weight_gen=0.03), gan=True)
    lat, noise, cond, _ = toy_batch(5)
    calls = []
    hook = pipe.student.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw.get("encoder_hidden_states")), with_kwargs=True
    )
    pipe.compute_discriminator_loss(lat, noise, cond)
    hook.remove()
    assert len(calls) == 4 and all(c is cond for c in calls)


# --- what each network call receives ----------------------------------------------------------


class Spy(ToyDiT):
    """A ToyDiT that records every call's keyword arguments; returns a non-tensor when
    ``broken(call)`` says so."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []
        self.broken = lambda call: False

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
        call = {"hidden_states": hidden_states, "timestep": timestep}
        call.update(encoder_hidden_states=encoder_hidden_states, **kwargs)
        self.calls.append(call)
        if self.broken(call):
            return 7
        known = {k: v for k, v in kwargs.items() if k in ("pooled_projections", "return_dict")}
        return super().forward(hidden_states, timestep, encoder_hidden_states, **known)


def spy_pipeline(cfg: DMDConfig, gan: bool = False) -> DMDPipeline:
    torch.manual_seed(0)
    teacher = Spy()
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    disc = None
    if gan:
        fastgen.attach_feature_capture(teacher, [0, 1], blocks="transformer_blocks")
        disc = ToyTokenDiscriminator()
    return DMDPipeline(student, teacher, fake, cfg, discriminator=disc)


def _message(call, error) -> str:
    with pytest.raises(error) as info:
        call()
    return str(info.value)


def test_constructor_errors_name_the_argument_and_the_type():
    net, cfg = nn.Linear(1, 1), DMDConfig()
    for i, name in enumerate(("student", "teacher", "fake_score")):
        nets = [net] * 3
        nets[i] = 42
        assert _message(lambda nets=nets: DMDPipeline(*nets, cfg), TypeError) == (
            f"{name} must be an nn.Module, got int"
        )
    assert _message(lambda: DMDPipeline(net, net, net, cfg, discriminator="D"), TypeError) == (
        "discriminator must be an nn.Module or None, got str"
    )
    assert _message(lambda: DMDPipeline(net, net, net, {}), TypeError) == (
        "config must be a DMDConfig, got dict"
    )
    gan = DMDConfig(gan_loss_weight_gen=0.1)
    assert _message(lambda: DMDPipeline(net, net, net, gan), ValueError) == (
        "gan_loss_weight_gen > 0 needs a discriminator= for DMDPipeline"
    )
    assert _message(lambda: DMDPipeline(net, net, net, cfg, discriminator=net), ValueError) == (
        "a discriminator reads teacher features: attach a capture to the teacher first, "
        "fastgen.dmd.attach_feature_capture(teacher, taps=[...])"
    )


def test_loss_errors_in_full():
    lat, noise, cond, neg = toy_batch(5)
    guided = pipeline(config(guidance_scale=2.0))
    assert _message(lambda: guided.compute_student_loss(lat, noise, cond), ValueError) == (
        "guidance_scale = 2.0 needs negative_encoder_hidden_states (the unconditional teacher "
        "call's conditioning)"
    )
    plain = pipeline(config())
    assert _message(lambda: plain.compute_discriminator_loss(lat, noise, cond), ValueError) == (
        "compute_discriminator_loss needs a discriminator: DMDPipeline(..., discriminator=D) "
        "with a feature capture on the teacher"
    )
    gan = pipeline(config(gan_loss_weight_gen=0.1), gan=True)
    with pytest.raises(ValueError, match=r"^latents and noise must have the same shape"):
        gan.compute_discriminator_loss(lat, noise[:, :2], cond)
    batched = spy_pipeline(config(guidance_scale=2.0, guidance_batching="batched"))
    what = "guidance_batching='batched' needs"

    def student(cond, **kwargs):
        return lambda: batched.compute_student_loss(
            lat, noise, cond, negative_encoder_hidden_states=neg, **kwargs
        )

    assert _message(student(cond, negative_model_kwargs={"b": 1}, a=1), ValueError) == (
        f"{what} the same keyword arguments in both teacher calls, got ['a'] and ['a', 'b']"
    )
    assert _message(student(None), ValueError) == (
        f"{what} encoder_hidden_states and negative_encoder_hidden_states of one shape, got "
        "None and (5, 3, 8)"
    )
    assert _message(student(cond, negative_model_kwargs={"a": 2}, a=1), ValueError) == (
        f"{what} every keyword argument to be batch-shaped or shared by both calls; 'a' differs"
    )


def _broken_cases():
    """(config, gan, loss, which network breaks, on which call) for every call site."""
    lat, noise, cond, neg = toy_batch(5)

    def student_loss(pipe):
        return pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)

    def fake_loss(pipe):
        return pipe.compute_fake_score_loss(lat, noise, cond)

    def disc_loss(pipe):
        return pipe.compute_discriminator_loss(lat, noise, cond)

    always = lambda call: True  # noqa: E731
    unconditional = lambda call: call["encoder_hidden_states"] is neg  # noqa: E731
    cfg, gan = config(guidance_scale=2.0), config(gan_loss_weight_gen=0.1)
    batched = config(guidance_scale=2.0, guidance_batching="batched")
    return {
        "student-loss/fake_score": (cfg, False, student_loss, "fake_score", always),
        "student-loss/teacher": (cfg, False, student_loss, "teacher", always),
        "student-loss/unconditional-teacher": (cfg, False, student_loss, "teacher", unconditional),
        "student-loss/batched-teacher": (batched, False, student_loss, "teacher", always),
        "student-loss/gan-teacher": (gan, True, student_loss, "teacher", always),
        "student-loss/student": (cfg, False, student_loss, "student", always),
        "fake-score-loss/fake_score": (cfg, False, fake_loss, "fake_score", always),
        "discriminator-loss/teacher": (gan, True, disc_loss, "teacher", always),
    }


BROKEN = _broken_cases()


@pytest.mark.parametrize("case", BROKEN)
def test_a_bad_output_names_the_network_that_returned_it(case):
    cfg, gan, loss, role, when = BROKEN[case]
    pipe = spy_pipeline(cfg, gan=gan)
    getattr(pipe, role).broken = when
    with pytest.raises(TypeError, match=rf"^the {role} returned int; expected a Tensor"):
        loss(pipe)


class TupleNet(ToyDiT):
    """ToyDiT's prediction first in a tuple or list, with something else after it."""

    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        out = super().forward(hidden_states, timestep, encoder_hidden_states).sample
        return self.wrap(out)


@pytest.mark.parametrize(
    "wrap",
    [lambda out: (out,), lambda out: [out, out + 1.0], lambda out: (out, "aux")],
    ids=["1-tuple", "list", "tuple-with-non-tensor"],
)
def test_tuple_outputs_give_their_first_element(wrap):
    losses = []
    for net in (ToyDiT(), TupleNet(wrap)):
        torch.manual_seed(0)
        nets = [copy.deepcopy(net) for _ in range(3)]
        for other in nets:
            other.load_state_dict(nets[0].state_dict())
        pipe = DMDPipeline(*nets, config())
        torch.manual_seed(1)
        losses.append(pipe.compute_student_loss(*toy_batch(5)[:3])["total"])
    assert torch.equal(losses[0], losses[1])


def test_an_empty_tuple_is_a_clear_error():
    class Empty(nn.Module):
        def forward(self, **kwargs):
            return ()

    pipe = DMDPipeline(Empty(), Empty(), Empty(), config())
    with pytest.raises(TypeError, match=r"^the student returned tuple; expected a Tensor"):
        pipe.compute_student_loss(*toy_batch(5)[:2])


def _all_calls(pipe: DMDPipeline) -> list[dict]:
    return pipe.student.calls + pipe.teacher.calls + pipe.fake_score.calls


class _DeviceLog(TorchDispatchMode):
    """Records every op whose tensor output is not on the meta device."""

    def __init__(self):
        super().__init__()
        self.off_device: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                self.off_device.append(f"{func}: {leaf.device}")
        return out


@pytest.mark.parametrize(
    "cfg",
    [
        config(),
        multistep(guidance_scale=2.0, backward_simulation=True),
        config(gan_loss_weight_gen=0.1, gan_r1_reg_weight=1.0),
        multistep(guidance_scale=2.0, backward_simulation=True, rung_sampling="stratified"),
    ],
    ids=["1step", "4step-backsim-cfg", "gan-r1", "4step-stratified"],
)
def test_every_tensor_stays_on_the_inputs_device(cfg):
    """Meta tensors stand in for an accelerator: nothing may be created on the default device."""
    gan = cfg.gan_loss_weight_gen > 0
    pipe = spy_pipeline(cfg, gan=gan)
    for net in (pipe.student, pipe.teacher, pipe.fake_score, pipe.discriminator):
        if net is not None:
            net.to("meta")
    lat, noise, cond, neg = (x.to("meta") for x in toy_batch(5))
    with _DeviceLog() as log:
        outs = [
            pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg),
            pipe.compute_fake_score_loss(lat, noise, cond),
        ]
        if gan:
            outs.append(pipe.compute_discriminator_loss(lat, noise, cond))
    # every op's output, the library's own included (0-d ones too: a 0-d tensor made on the
    # host would still combine with device tensors, but be drawn on the host)
    assert log.off_device == [], log.off_device
    assert all(v.is_meta for out in outs for v in out.values())
    calls = _all_calls(pipe)
    assert calls and all(c["hidden_states"].is_meta and c["timestep"].is_meta for c in calls)
    assert pipe.sample_timesteps(3).is_meta and pipe.sample_timesteps(3, device="meta").is_meta


@pytest.mark.parametrize(
    "cfg",
    [
        config(guidance_scale=2.0),
        multistep(guidance_scale=2.0, backward_simulation=True),
        multistep(guidance_scale=2.0, backward_simulation=True, rung_sampling="stratified"),
    ],
    ids=["1step", "4step-backsim", "4step-stratified"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_networks_see_the_latents_dtype_and_float32_timesteps(cfg, dtype):
    pipe = spy_pipeline(cfg)
    lat, noise, cond, neg = toy_batch(5, dtype=dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # nothing may rely on the default dtype
    try:
        pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)
        pipe.compute_fake_score_loss(lat, noise, cond)
    finally:
        torch.set_default_dtype(default)
    calls = _all_calls(pipe)
    # 1 step: student, fake score, teacher twice; student, fake score. 4 steps: 3 unrolled.
    assert len(calls) == {1: 6, 4: 12}[cfg.student_sample_steps]
    assert all(c["hidden_states"].dtype == dtype for c in calls)
    assert all(c["timestep"].dtype == torch.float32 for c in calls)
    assert pipe.sample_timesteps(3, dtype=torch.float64).dtype == torch.float64


def test_one_step_student_input_is_max_t_noise_rounded_once():
    pipe = spy_pipeline(config())
    lat, noise, cond, _ = toy_batch(64)
    pipe.compute_student_loss(lat, noise, cond)
    x_s = pipe.student.calls[0]["hidden_states"]
    assert torch.equal(x_s, (noise.double() * 0.999).float())
    assert not torch.equal(x_s, noise * 0.999)  # float32 arithmetic rounds the product first


def test_backward_simulation_starts_from_fresh_noise_at_the_first_rung(monkeypatch):
    pipe = spy_pipeline(multistep(backward_simulation=True))
    lat, noise, cond, _ = toy_batch(64)
    fresh = torch.randn(lat.shape, dtype=torch.float64)  # digits beyond float32
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: fresh.to(kw.get("dtype") or x.dtype))
    pipe.student_input(lat, noise, cond)
    first = pipe.student.calls[0]
    assert torch.equal(first["hidden_states"], (fresh * LADDER[0]).float())
    assert torch.equal(first["timestep"], torch.full((64,), LADDER[0]))


def test_fake_score_and_teacher_see_a_detached_sample_without_the_gan_branch():
    pipe = spy_pipeline(config(guidance_scale=2.0))
    lat, noise, cond, neg = toy_batch(5)
    pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)
    assert pipe.student.calls[0]["hidden_states"].requires_grad is False
    assert len(pipe.teacher.calls) == 2 and len(pipe.fake_score.calls) == 1
    assert not any(c["hidden_states"].requires_grad for c in pipe.teacher.calls)
    assert not pipe.fake_score.calls[0]["hidden_states"].requires_grad


def test_teacher_and_fake_x0_enter_vsd_unrounded(monkeypatch):
    seen = []

    def spy(gen, teacher_x0, fake_x0, **kwargs):
        seen.append((gen.dtype, teacher_x0.dtype, fake_x0.dtype))
        return fastgen.vsd_loss(gen, teacher_x0, fake_x0, **kwargs)

    monkeypatch.setattr(fastgen.dmd.pipeline, "vsd_loss", spy)
    for cfg in (config(), config(guidance_scale=2.0), multistep(backward_simulation=True)):
        pipe = pipeline(cfg)
        lat, noise, cond, neg = toy_batch(5, dtype=torch.bfloat16)
        pipe.compute_student_loss(lat, noise, cond, negative_encoder_hidden_states=neg)
    assert seen == [(torch.bfloat16, torch.float64, torch.float64)] * 3


def test_unconditional_call_gets_the_negative_mask_or_none():
    lat, noise, cond, neg = toy_batch(5)
    mask, neg_mask = torch.ones(5, 3), torch.zeros(5, 3)
    for given, expected in ((None, None), (neg_mask, neg_mask)):
        pipe = spy_pipeline(config(guidance_scale=2.0))
        pipe.compute_student_loss(
            lat, noise, cond, negative_encoder_hidden_states=neg,
            negative_encoder_hidden_states_mask=given, encoder_hidden_states_mask=mask,
        )  # fmt: skip
        cond_call, uncond_call = pipe.teacher.calls
        assert cond_call["encoder_hidden_states_mask"] is mask
        assert uncond_call.get("encoder_hidden_states_mask") is expected


def test_batched_guidance_concatenates_per_sample_keyword_arguments():
    lat, noise, cond, neg = toy_batch(5)
    kwargs = {"pooled": torch.randn(5, 3), "lens": torch.arange(5.0), "shared": torch.tensor(2.0)}
    negative = {"pooled": torch.zeros(5, 3), "lens": torch.zeros(5)}
    pipe = spy_pipeline(config(guidance_scale=2.0, guidance_batching="batched"))
    pipe.teacher.broken = lambda call: False

    def forward(hidden_states, timestep, encoder_hidden_states=None, **kw):
        pipe.teacher.calls.append(kw)
        return (
            hidden_states * (kw["pooled"].sum(1) + kw["lens"] + kw["shared"])[:, None, None, None]
        )

    pipe.teacher.forward = forward
    for net in (pipe.student, pipe.fake_score):
        net.forward = lambda hidden_states, timestep, encoder_hidden_states=None, **kw: (
            hidden_states
        )
    pipe.compute_student_loss(
        lat, noise, cond, negative_encoder_hidden_states=neg, negative_model_kwargs=negative,
        **kwargs,
    )  # fmt: skip
    (call,) = pipe.teacher.calls
    assert torch.equal(call["pooled"], torch.cat([kwargs["pooled"], negative["pooled"]]))
    assert torch.equal(call["lens"], torch.cat([kwargs["lens"], negative["lens"]]))
    assert call["shared"] is kwargs["shared"]


def _bf16_nearest(p: float) -> float:
    """``p`` rounded to bfloat16 (8 significant bits), to nearest, ties to even."""
    spacing = 2.0 ** (math.frexp(p)[1] - 8)
    return round(p / spacing) * spacing  # exact: a power-of-two scaling, round() ties to even


def test_scaled_timestep_is_rounded_once_to_the_latents_dtype(monkeypatch):
    # t such that t * 1000 lands on a bfloat16 tie once rounded to float32 but not exactly:
    # rounding through float32 would pick the even neighbour, rounding once the nearer one.
    ts = []
    for k in range(200, 1000):
        lo = _bf16_nearest(float(k))
        hi = lo + 2.0 ** (math.frexp(lo)[1] - 8)
        tie = (lo + hi) / 2
        for t in (torch.tensor(tie / 1000).float(),):
            p = float(t) * 1000.0  # exact in float64: 24 + 10 significant bits
            if float(torch.tensor(p).float()) == tie != p and _bf16_nearest(p) != _bf16_nearest(
                tie
            ):
                ts.append(float(t))
    assert len(ts) >= 8
    ts = torch.tensor(sorted(set(ts)))
    nets = [Recorder() for _ in range(3)]
    pipe = DMDPipeline(*nets, config(num_train_timesteps=1000, timestep_dtype="latents"))
    monkeypatch.setattr(pipe, "sample_timesteps", lambda n, **kw: ts)
    lat = torch.randn(len(ts), 2, 4, dtype=torch.bfloat16)
    pipe.compute_student_loss(lat, torch.randn_like(lat))
    seen = nets[2].seen[0]
    assert seen.dtype == torch.bfloat16
    assert seen.double().tolist() == [_bf16_nearest(float(t) * 1000.0) for t in ts]


def test_student_total_adds_the_weighted_gan_term_rounded_once():
    # 40 batches: a float32 sum of two float32 terms differs from the once-rounded one in
    # about one case in ten when the terms are of similar size
    weight = 0.3
    pipe = pipeline(config(gan_loss_weight_gen=weight), gan=True)
    for seed in range(40):
        torch.manual_seed(seed)
        out = pipe.compute_student_loss(*toy_batch(5)[:3])
        assert out["total"].dtype == torch.float32
        want = out["vsd"].double() + weight * out["gan_gen"].double()
        assert torch.equal(out["total"], want.float()), seed


def test_discriminator_total_is_rounded_once():
    weight = 0.3  # alpha 10: an R1 term of the size of the GAN term, so both roundings show
    cfg = config(gan_loss_weight_gen=0.03, gan_r1_reg_weight=weight, gan_r1_reg_alpha=10.0)
    pipe = pipeline(cfg, gan=True)
    for seed in range(40):
        torch.manual_seed(seed)
        out = pipe.compute_discriminator_loss(*toy_batch(5)[:3])
        assert out["total"].dtype == torch.float32
        assert 0.01 < float(weight * out["r1"] / out["gan_disc"]) < 100
        want = out["gan_disc"].double() + weight * out["r1"].double()
        assert torch.equal(out["total"], want.float()), seed


def test_r1_perturbation_is_rounded_once_from_float64(monkeypatch):
    cfg = config(gan_loss_weight_gen=0.1, gan_r1_reg_weight=1.0, gan_use_same_t_noise=True)
    pipe = spy_pipeline(cfg, gan=True)
    lat, noise, cond, _ = toy_batch(16)
    z = torch.randn(lat.shape, dtype=torch.float64)
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: z.to(kw.get("dtype") or x.dtype))
    pipe.compute_discriminator_loss(lat, noise, cond)
    _fake, real, perturbed = pipe.teacher.calls
    assert perturbed["hidden_states"].dtype == torch.float32
    want = lat.double() + 0.1 * z.float().double()  # the draw is in the latents' dtype
    assert torch.equal(perturbed["hidden_states"], want.float())
    assert torch.equal(perturbed["timestep"], real["timestep"])


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_wrapped_discriminator_gives_the_plain_logits_and_no_weight_grads(one_rank_group, wrap):
    """DDP is looked through (its reducer would wait for weight grads that never come); an
    FSDP2 discriminator is called as it is, frozen by the caller around the student update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = config(gan_loss_weight_gen=0.1)
    plain, wrapped = pipeline(cfg, gan=True), pipeline(cfg, gan=True)
    disc = wrapped.discriminator
    if wrap == "ddp":
        wrapped.discriminator = disc = nn.parallel.DistributedDataParallel(disc)
    else:
        fully_shard(disc, mesh=init_device_mesh("cpu", (1,)))
        wrapped = DMDPipeline(
            wrapped.student, wrapped.teacher, wrapped.fake_score, cfg, discriminator=disc
        )
        disc.requires_grad_(False)

    for _ in range(2):  # a second update: DDP's reducer would complain about the first
        outs = []
        for pipe in (plain, wrapped):
            torch.manual_seed(0)
            out = pipe.compute_student_loss(*toy_batch(5)[:3])
            out["total"].backward()
            outs.append(out)
        assert torch.equal(outs[0]["gan_gen"], outs[1]["gan_gen"])
        assert all(p.grad is None for p in disc.parameters())
        assert wrapped.student.proj_out.weight.grad.abs().sum() > 0


# --- rung_sampling="stratified" ---------------------------------------------------------------


def _rung_of(t: torch.Tensor) -> list[int]:
    rungs = torch.tensor(LADDER[:-1], dtype=torch.float32)
    return [int((rungs == v).nonzero()) for v in t]


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_stratified_rungs_are_uniform_per_sample_in_groups_differing_by_one(n):
    pipe = pipeline(multistep(rung_sampling="stratified"))
    lat, noise, _, _ = toy_batch(n)
    torch.manual_seed(0)
    draws = 4000
    counts = torch.zeros(n, 4)
    for _ in range(draws):
        k = torch.tensor(_rung_of(pipe.student_input(lat, noise, None)[1]))
        group = torch.bincount(k, minlength=4)
        assert int(group.max() - group.min()) <= 1, group  # groups of n // 4 or n // 4 + 1
        counts[torch.arange(n), k] += 1
    # each sample: rung frequencies within 5 binomial sigmas of 1/4
    sigma = (draws * 0.25 * 0.75) ** 0.5
    assert float((counts - draws / 4).abs().max()) < 5 * sigma, counts


@pytest.mark.parametrize("conditioned", [True, False])
@pytest.mark.parametrize("n", [5, 8])
def test_stratified_unroll_runs_each_call_on_the_rows_that_need_it(n, conditioned):
    pipe = spy_pipeline(multistep(backward_simulation=True, rung_sampling="stratified"))
    lat, noise, cond, _ = toy_batch(n)
    pipe.compute_student_loss(lat, noise, cond if conditioned else None)
    rows = [c["hidden_states"].shape[0] for c in pipe.student.calls]
    assert rows == [-(-(3 - j) * n // 4) for j in range(3)] + [n]
    assert all((c["encoder_hidden_states"] is None) != conditioned for c in pipe.student.calls)


def test_stratified_unroll_starts_from_fresh_noise_rounded_once(monkeypatch):
    pipe = spy_pipeline(multistep(backward_simulation=True, rung_sampling="stratified"))
    lat, noise, cond, _ = toy_batch(64)
    fresh = torch.randn(lat.shape, dtype=torch.float64)  # digits beyond float32
    monkeypatch.setattr(
        torch, "randn", lambda size, **kw: fresh[: size[0]].to(kw.get("dtype") or torch.float32)
    )
    pipe.student_input(lat, noise, cond)
    first = pipe.student.calls[0]
    assert torch.equal(first["hidden_states"], (fresh[:48] * LADDER[0]).float())


@pytest.mark.parametrize("sample_type", ["ode", "sde"])
def test_stratified_unroll_gives_each_sample_its_rungs_input(monkeypatch, sample_type):
    """Each sample's input equals the one the independent path gives for the same rung, the
    same fresh noise (and, for sde, the same step noise)."""
    n = 7
    cfgs = {
        mode: multistep(
            backward_simulation=True, student_sample_type=sample_type, rung_sampling=mode
        )
        for mode in ("independent", "stratified")
    }
    pipe = spy_pipeline(cfgs["stratified"])
    lat, noise, cond, _ = toy_batch(n)
    fresh = torch.randn(n, 4, 8, 8, dtype=torch.float64)
    steps = [torch.randn(n, 4, 8, 8) for _ in range(2)]
    with monkeypatch.context() as m:
        m.setattr(torch, "randn", lambda size, **kw: fresh[: size[0]].to(kw["dtype"]))
        queue = list(steps)
        m.setattr(torch, "randn_like", lambda x, **kw: queue.pop(0)[: x.shape[0]])
        x_s, t_s = pipe.student_input(lat, noise, cond)
    k = _rung_of(t_s)
    # which sample sits in which unrolled row: the gathered conditioning tells
    first = pipe.student.calls[0]["encoder_hidden_states"]
    row = {i: r for i in range(n) for r in range(first.shape[0]) if torch.equal(first[r], cond[i])}
    assert {i for i in range(n) if k[i] > 0} <= set(row)  # (a spare row may hold a rung 0)
    # the independent path, fed sample i's row of every draw
    plain = DMDPipeline(pipe.student, pipe.teacher, pipe.fake_score, cfgs["independent"])
    gather = torch.tensor([row.get(i, 0) for i in range(n)])
    with monkeypatch.context() as m:
        m.setattr(torch, "randint", lambda lo, hi, size, **kw: torch.tensor(k))
        draws = [fresh[gather]] + [s[gather] for s in steps]
        m.setattr(torch, "randn_like", lambda x, **kw: draws.pop(0).to(kw.get("dtype") or x.dtype))
        x_ref, t_ref = plain.student_input(lat, noise, cond)
    assert torch.equal(t_s, t_ref)
    # batch composition changes the network's float32 rounding, nothing else
    torch.testing.assert_close(x_s, x_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(
        x_s[[i for i in range(n) if k[i] == 0]], x_ref[[i for i in range(n) if k[i] == 0]]
    )


def test_stratified_unroll_gathers_per_sample_keyword_arguments():
    pipe = spy_pipeline(multistep(backward_simulation=True, rung_sampling="stratified"))
    lat, noise, cond, _ = toy_batch(6)
    pooled, shared = torch.arange(6.0)[:, None].expand(6, 3), torch.tensor(2.0)
    lens = torch.arange(6.0)  # one value per sample, 1-D
    pipe.student_input(lat, noise, cond, pooled=pooled, shared=shared, lens=lens)
    for call in pipe.student.calls:
        index = call["pooled"][:, 0].long()  # the rows' sample numbers
        assert torch.equal(call["encoder_hidden_states"], cond[index])
        assert torch.equal(call["lens"], lens[index])
        assert call["shared"] is shared
    # a list as long as the batch is refused from 2 samples on; with 1 it is that sample's
    one = spy_pipeline(multistep(backward_simulation=True, rung_sampling="stratified"))
    one.student_input(lat[:1], noise[:1], cond[:1], txt=[7])
    assert all(c["txt"] == [7] for c in one.student.calls)
    with pytest.raises(ValueError, match="not a list of 2"):
        one.student_input(lat[:2], noise[:2], cond[:2], txt=[7, 8])
    with pytest.raises(
        ValueError, match=r"pass 'lens' as a tensor \(batch first\), not a list of 6"
    ):
        pipe.student_input(lat, noise, cond, lens=[1] * 6)


def test_rung_sampling_is_checked():
    assert DMDConfig().rung_sampling == "independent"
    with pytest.raises(pydantic.ValidationError, match="rung_sampling"):
        multistep(rung_sampling="sorted")
