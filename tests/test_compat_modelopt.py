"""fastgen.compat.modelopt against modelopt.torch.fastgen: the same module tree, names and
signatures, modelopt's exception types, its v target, its _call_model extension point."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from pydantic import BaseModel
from torch import nn

import fastgen
import fastgen.compat.modelopt as compat

mtf = pytest.importorskip("modelopt.torch.fastgen")

MODULES = [
    "",
    ".config",
    ".flow_matching",
    ".losses",
    ".utils",
    ".ema",
    ".factory",
    ".loader",
    ".pipeline",
    ".methods",
    ".methods.dmd",
    ".discriminators",
    ".plugins",
    ".plugins.qwen_image",
]


def public(module) -> list[str]:
    names = getattr(module, "__all__", None)
    return sorted(names if names is not None else (n for n in vars(module) if n[0] != "_"))


def accepted(config_class) -> set[str]:
    """The keys a pydantic config accepts: field names and their alias choices."""
    names = set(config_class.model_fields)
    for field in config_class.model_fields.values():
        names.update(getattr(field.validation_alias, "choices", ()))
    return names


def parameters(obj) -> dict[str, inspect.Parameter]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    return dict(inspect.signature(target).parameters)


@pytest.mark.parametrize("suffix", MODULES)
def test_every_public_name_of_each_modelopt_module_is_there_with_its_signature(suffix):
    theirs_root = "modelopt.torch.fastgen"
    theirs = importlib.import_module(theirs_root + suffix)
    ours = importlib.import_module("fastgen.compat.modelopt" + suffix)
    names = [
        n  # leave out what modelopt imports from elsewhere (import_plugin)
        for n in public(theirs)
        if inspect.ismodule(getattr(theirs, n))
        or getattr(getattr(theirs, n), "__module__", theirs_root).startswith(theirs_root)
    ]
    missing = sorted(set(names) - set(dir(ours)))
    assert not missing, f"{suffix or 'top level'} lacks {missing}"
    for name in names:
        a, b = getattr(theirs, name), getattr(ours, name)
        if inspect.ismodule(a):
            assert inspect.ismodule(b), name
            continue
        if not callable(a):
            continue
        if inspect.isclass(a) and issubclass(a, BaseModel):
            assert set(a.model_fields) <= accepted(b), name
            continue
        ps_a, ps_b = parameters(a), parameters(b)
        for pname, p in ps_a.items():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            assert pname in ps_b, f"{name}: no parameter {pname!r}"
            q = ps_b[pname]
            assert (q.kind, q.default) == (p.kind, p.default), f"{name}.{pname}: {q} vs {p}"
        for pname in set(ps_b) - set(ps_a):  # fastgen's extras: keyword-only, optional
            q = ps_b[pname]
            assert q.kind in (q.KEYWORD_ONLY, q.VAR_KEYWORD) and (
                q.kind == q.VAR_KEYWORD or q.default is not q.empty
            ), f"{name}.{pname}"


class Linear(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.transformer_blocks = nn.ModuleList([nn.Identity()])

    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None, **kwargs):
        return self.transformer_blocks[0](self.lin(hidden_states))


def test_wiring_mistakes_raise_modelopts_runtime_errors():
    cfg = compat.DMDConfig(gan_loss_weight_gen=0.03)
    pipe = compat.DMDPipeline(Linear(), Linear(), Linear(), cfg, discriminator=nn.Identity())
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="attach_feature_capture"):
        pipe.compute_student_loss(x, x)
    with pytest.raises(RuntimeError, match="attach_feature_capture"):
        pipe.compute_discriminator_loss(x, x)
    bare = compat.DMDPipeline(Linear(), Linear(), Linear(), compat.DMDConfig())
    with pytest.raises(RuntimeError, match="discriminator"):
        bare.compute_discriminator_loss(x, x)
    with pytest.raises(ValueError, match="discriminator"):  # as modelopt: at construction
        compat.DMDPipeline(Linear(), Linear(), Linear(), cfg)
    # fastgen itself reports the missing capture at construction
    with pytest.raises(ValueError, match="attach a capture"):
        fastgen.DMDPipeline(Linear(), Linear(), Linear(), cfg, discriminator=nn.Identity())


def test_the_pipelines_are_distillation_pipelines_as_in_modelopt():
    for cls in (compat.DMDPipeline, compat.plugins.QwenImageDMDPipeline):
        assert issubclass(cls, compat.DistillationPipeline) and issubclass(cls, fastgen.DMDPipeline)
    assert issubclass(mtf.DMDPipeline, mtf.DistillationPipeline)
    pipe = compat.DMDPipeline(Linear(), Linear(), Linear(), compat.DMDConfig())
    assert pipe.sample_timesteps(3).shape == (3,) and pipe.dtype == torch.float32


def test_create_fake_score_refuses_a_sharded_looking_teacher_with_runtime_error():
    teacher = nn.Linear(2, 2)
    teacher.weight.full_tensor = lambda: teacher.weight
    with pytest.raises(RuntimeError, match="meta-init"):
        compat.create_fake_score(teacher)
    assert compat.create_fake_score(teacher, deep_copy=False) is teacher


def test_a_capture_attached_after_construction_is_found():
    teacher = Linear()
    cfg = compat.DMDConfig(gan_loss_weight_gen=0.03)
    pipe = compat.DMDPipeline(Linear(), teacher, Linear(), cfg, discriminator=Head())
    fastgen.attach_feature_capture(teacher, ["transformer_blocks.0"])
    x = torch.randn(3, 4)
    assert set(pipe.compute_student_loss(x, x)) == {"vsd", "gan_gen", "total"}
    compat.plugins.remove_feature_capture(teacher)
    assert pipe.capture is None
    compat.plugins.remove_feature_capture(teacher)  # a no-op the second time


class Head(nn.Module):
    def forward(self, features):
        return features[0].mean(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dsm_loss_v_is_modelopts_v_target_rounded_once(dtype):
    torch.manual_seed(0)
    x0, eps, pred = (torch.randn(3, 2, 5).to(dtype) for _ in range(3))
    t = torch.rand(3).to(dtype)
    ours = compat.losses.dsm_loss(
        "v",
        pred,
        x0=x0,
        eps=eps,
        t=t,
        alpha_fn=compat.flow_matching.rf_alpha,
        sigma_fn=compat.flow_matching.rf_sigma,
    )
    x0_d, eps_d, t_d = x0.double(), eps.double(), t.double()[:, None, None]
    target = ((1 - t_d) * eps_d - t_d * x0_d).to(dtype).double()  # the target, rounded once
    reference = ((pred.double() - target) ** 2).mean().to(dtype)
    assert torch.equal(ours, reference)
    theirs = mtf.losses.dsm_loss(
        "v",
        pred,
        x0=x0,
        eps=eps,
        t=t,
        alpha_fn=mtf.flow_matching.rf_alpha,
        sigma_fn=mtf.flow_matching.rf_sigma,
    )
    torch.testing.assert_close(
        ours.double(), theirs.double(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0
    )
    # any other alpha/sigma: the general formula, in float64
    general = compat.losses.dsm_loss(
        "v", pred, x0=x0, eps=eps, t=t, alpha_fn=lambda t: 1 - t, sigma_fn=lambda t: t
    )
    torch.testing.assert_close(general.double(), reference.double(), rtol=1e-2, atol=0)


def test_dsm_loss_needs_only_what_its_target_reads():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(compat.losses.dsm_loss("x0", eps, x0=x0), ((eps - x0) ** 2).mean())
    assert torch.equal(compat.losses.dsm_loss("eps", x0, eps=eps), ((x0 - eps) ** 2).mean())
    for kwargs, missing in (({"x0": x0}, "eps"), ({"eps": eps, "x0": x0}, "alpha_fn")):
        kind = "flow" if missing == "eps" else "v"
        with pytest.raises(ValueError, match=missing):
            compat.losses.dsm_loss(kind, x0, **kwargs, t=torch.rand(2))
    with pytest.raises(ValueError, match="pred_type"):
        compat.losses.dsm_loss("score", x0, x0=x0)


def test_a_subclass_call_model_runs_every_network_call():
    calls = []

    class Recording(compat.DMDPipeline):
        def _call_model(self, model, hidden_states, timestep, encoder_hidden_states=None, **kw):
            calls.append((model, timestep))
            return super()._call_model(model, hidden_states, timestep, encoder_hidden_states, **kw)

    student, teacher, fake = Linear(), Linear(), Linear()
    cfg = compat.DMDConfig(num_train_timesteps=1000, guidance_scale=2.0)
    pipe = Recording(student, teacher, fake, cfg)
    x = torch.randn(2, 4)
    pipe.compute_student_loss(x, x, negative_encoder_hidden_states=torch.zeros(2, 1))
    assert [m for m, _ in calls] == [student, fake, teacher, teacher]
    assert all(t.dtype == torch.float32 and t.max() <= 1 for _, t in calls)  # t, not 1000 t


def test_the_alias_makes_modelopts_names_fastgens_modules():
    import sys

    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "modelopt"}
    try:
        for name in saved:
            del sys.modules[name]
        import modelopt_alias

        modelopt_alias.install()
        import modelopt.torch.fastgen as alias
        from modelopt.torch.fastgen.methods import dmd
        from modelopt.torch.fastgen.plugins.qwen_image import QwenImageDMDPipeline

        assert alias is compat and dmd is compat.methods.dmd
        assert QwenImageDMDPipeline is compat.plugins.qwen_image.QwenImageDMDPipeline
        assert not hasattr(sys.modules["modelopt"], "__file__")  # nothing of modelopt's own
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "modelopt"]:
            del sys.modules[name]
        sys.modules.update(saved)
