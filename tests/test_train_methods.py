"""The consistency family in the trainer and the CLI: a recipe names its method; sCM, rCM and
MeanFlow train, checkpoint, resume bitwise, log, sample and export like DMD2; their losses
trace in one frame; MeanFlowNet starts as its teacher."""

from __future__ import annotations

import copy
import json

import pydantic
import pytest
import torch
import yaml
from families import build, run_yaml, samples
from toys import ToyDiT
from train_toys import Data

import fastgen
from fastgen.cli import main
from fastgen.consistency import MeanFlowConfig, RCMConfig, SCMConfig
from fastgen.consistency.networks import MeanFlowNet
from fastgen.train import Trainer
from fastgen.train.config import RunConfig
from fastgen.train.recipes import list_method_recipes, load_method_config, method_of

METHODS = ["scm", "rcm", "meanflow"]
CLASSES = {"dmd2": fastgen.DMDConfig, "scm": SCMConfig, "rcm": RCMConfig,
           "meanflow": MeanFlowConfig}  # fmt: skip
FAMILIES = ["sd3", "flux", "wan21", "qwen_image"]


# --- recipes ------------------------------------------------------------------------------


def test_every_method_has_a_builtin_recipe_per_family():
    recipes = list_method_recipes()
    for method in ["dmd2", *METHODS]:
        for family in FAMILIES:
            assert recipes[f"{method}_{family}"] == method


@pytest.mark.parametrize("name", sorted(list_method_recipes()))
def test_a_builtin_recipe_loads_as_its_methods_config(name):
    config = load_method_config(name)
    method = list_method_recipes()[name]
    assert type(config) is CLASSES[method] and method_of(config) == method
    if method != "dmd2":
        assert config.mode == "distillation" and config.ema is not None


def test_a_run_switches_method_by_recipe_and_overrides_its_section():
    run = RunConfig(out="x", steps=1, recipe="meanflow_sd3", meanflow={"r_sample_ratio": 0.5})
    assert run.method == "meanflow" and run.method_config().r_sample_ratio == 0.5
    assert RunConfig(out="x", steps=1, recipe="rcm_wan21").method_config().dmd_weight == 0.01
    assert RunConfig(out="x", steps=1, scm={"mode": "training"}).method == "scm"
    assert RunConfig(out="x", steps=1).method == "dmd2"
    wrong = RunConfig(out="x", steps=1, recipe="scm_sd3", dmd={"guidance_scale": 2.0})
    with pytest.raises(ValueError, match=r"dmd: overrides of another method.*set scm: instead"):
        wrong.method_config()
    with pytest.raises(ValueError, match="trains scm, not DMD2"):
        RunConfig(out="x", steps=1, recipe="scm_sd3").dmd_config()
    with pytest.raises(pydantic.ValidationError, match="r_sample_ratio"):
        RunConfig(
            out="x", steps=1, recipe="meanflow_sd3", meanflow={"r_sample_ratio": 2}
        ).method_config()


def test_a_nested_override_merges_into_the_recipes_section():
    recipe = load_method_config("rcm_wan21")
    run = RunConfig(out="x", steps=1, recipe="rcm_wan21",
                    rcm={"dmd": {"student_update_freq": 2}, "ema": {"decay": 0.5}})  # fmt: skip
    got = run.method_config()
    assert got.dmd.student_update_freq == 2 and got.ema.decay == 0.5
    # the recipe's other fields of those sections stay
    assert got.dmd.model_copy(update={"student_update_freq": 5}) == recipe.dmd
    assert got.dmd.guidance_scale == 3.0 and got.dmd.fake_score_pred_type == "x0"
    assert got.model_copy(update={"dmd": recipe.dmd, "ema": recipe.ema}) == recipe
    plain = RunConfig(out="x", steps=1, recipe="rcm_wan21", rcm={"ema": None}).method_config()
    assert plain.ema is None  # a null still replaces the section


@pytest.mark.parametrize("recipe", ["dmd2_qwen_image", "dmd2_sd3", "scm_sd3", "rcm_wan21"])
def test_under_fsdp2_the_ema_keeps_each_ranks_shard_unless_the_run_says(recipe):
    def mode(**fields) -> str:
        return RunConfig(out="x", steps=1, recipe=recipe, **fields).method_config().ema.mode

    section = "dmd" if recipe.startswith("dmd2") else recipe.split("_")[0]
    recipe_mode = load_method_config(recipe).ema.mode
    assert recipe_mode == "full_tensor"  # modelopt's library default (Qwen-Image's recipe says it)
    assert mode(parallel="fsdp2") == "local_shard"  # no whole copy of the student per rank
    assert mode(parallel="ddp") == mode() == recipe_mode
    keep = {section: {"ema": {"mode": "full_tensor"}}}
    assert mode(parallel="fsdp2", **keep) == "full_tensor"
    decay = {section: {"ema": {"decay": 0.5}}}
    got = RunConfig(out="x", steps=1, recipe=recipe, parallel="fsdp2", **decay).method_config()
    assert got.ema.mode == "local_shard" and got.ema.decay == 0.5
    off = RunConfig(out="x", steps=1, recipe=recipe, parallel="fsdp2", **{section: {"ema": None}})
    assert off.method_config().ema is None


def test_a_recipe_file_naming_an_unknown_method_is_an_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: consistency\n")
    with pytest.raises(ValueError, match="method must be one of"):
        RunConfig(out="x", steps=1, recipe=str(path)).method_config()


def test_cli_recipes_lists_every_method_with_its_knobs(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if not line.startswith("    ")]
    assert [h.split(" [")[0] for h in heads] == list(list_method_recipes())
    mf = heads.index(next(h for h in heads if h.startswith("meanflow_wan21 [meanflow]")))
    assert "config_mf.py" in heads[mf]
    assert "adaptive_weight_const=10.0" in lines[lines.index(heads[mf]) + 1]


# --- the trainer on toys ------------------------------------------------------------------

OVERRIDES = {
    "scm": {"tangent_warmup_steps": 3, "ema": {"decay": 0.9}},
    "rcm": {"tangent_warmup_steps": 3, "ema": {"decay": 0.9},
            "dmd": {"student_update_freq": 2, "num_train_timesteps": 1000, "guidance_scale": 7.0}},
    "meanflow": {"tangent_warmup_steps": 2, "ema": {"decay": 0.9}},
}  # fmt: skip


def toy_trainer(method, out, steps, **extra):
    run = RunConfig(out=str(out), steps=steps, recipe=f"{method}_sd3",
                    **{method: OVERRIDES[method]}, checkpoint={"every": 2},
                    log={"every": 1, "tensorboard": False, "progress": False}, **extra)  # fmt: skip
    torch.manual_seed(0)
    teacher = ToyDiT(dim=16, depth=2, r_embedding=method == "meanflow")
    student = copy.deepcopy(teacher) if method == "meanflow" else None  # it takes r already
    return Trainer(run, teacher=teacher, student=student, data=Data())


@pytest.mark.parametrize("method", METHODS)
def test_a_consistency_run_resumes_bitwise_and_saves_its_networks(tmp_path, method):
    straight = toy_trainer(method, tmp_path / "a", 4)
    result = straight.fit()
    losses = {k for k in result["scalars"] if k.startswith("loss/")}
    expected = {"scm": "loss/student/scm", "rcm": "loss/student/vsd",
                "meanflow": "loss/student/meanflow"}[method]  # fmt: skip
    assert expected in losses
    assert ("loss/fake_score/total" in losses) == (method == "rcm")
    assert ("grad_norm/weight_net" in result["scalars"]) == (method != "meanflow")
    meta = json.loads((tmp_path / "a" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    nets = {"scm": ["student", "weight_net"], "rcm": ["fake_score", "student", "weight_net"],
            "meanflow": ["student"]}[method]  # fmt: skip
    assert meta["sections"] == sorted([*nets, "ema"])
    assert sorted(meta["optimizers"]) == sorted(nets)
    saved = yaml.safe_load((tmp_path / "a" / f"{method}.yaml").read_text())
    assert saved["method"] == method and load_method_config(tmp_path / "a" / f"{method}.yaml")
    toy_trainer(method, tmp_path / "b", 2).fit()
    resumed = toy_trainer(method, tmp_path / "b", 4)
    assert resumed.fit()["resumed_from"] == 2
    for name, net in straight.pipeline.networks().items():
        other = resumed.pipeline.networks()[name].state_dict()
        for key, value in net.state_dict().items():
            assert torch.equal(value, other[key]), (name, key)
    a, b = straight.ema_student().state_dict(), resumed.ema_student().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj_out.weight"], straight.pipeline.teacher.proj_out.weight)


def test_a_compiled_meanflow_run_resumes_bitwise(tmp_path):
    """Inductor, the JVP inside the compiled student loss (one inductor test: sCM and rCM go
    through the same compiled-loss path)."""
    straight = toy_trainer("meanflow", tmp_path / "a", 4, compile=True)
    straight.fit()
    toy_trainer("meanflow", tmp_path / "b", 2, compile=True).fit()
    resumed = toy_trainer("meanflow", tmp_path / "b", 4, compile=True)
    assert resumed.fit()["resumed_from"] == 2
    a, b = straight.ema_student().state_dict(), resumed.ema_student().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = straight.pipeline.student.state_dict(), resumed.pipeline.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_validation_samples_are_the_methods_1_and_2_step_samples(tmp_path, method):
    trainer = toy_trainer(
        method, tmp_path, 1, validation={"every": 1, "samples": 2, "teacher_steps": 2}
    )
    trainer.fit()
    grids = torch.load(tmp_path / "samples" / "step_00000001.pt")
    assert sorted(grids) == ["1_step", "2_step", "teacher"]
    ema = trainer.ema_student()
    viewer = trainer._viewer
    if method == "meanflow":
        expect = fastgen.consistency.meanflow_sample(
            ema, viewer.noise, [1.0, 0.0], encoder_hidden_states=viewer.ehs,
            num_train_timesteps=1000,
        )  # fmt: skip
        assert torch.equal(viewer.student_samples(ema)[1]["x"], expect)


@pytest.mark.parametrize("method", METHODS)
def test_the_trainers_losses_trace_in_one_frame(tmp_path, method):
    from torch._dynamo.testing import CompileCounter

    trainer = toy_trainer(method, tmp_path, 1)
    batch = Data()()
    names = ["student", "fake_score"] if method == "rcm" else ["student"]
    for name in names:
        counter = CompileCounter()
        fn = torch.compile(trainer.losses[name], backend=counter, fullgraph=True)
        extra = {"iteration": torch.tensor(3)} if name == "student" else {}
        if name == "student":
            extra["negative_encoder_hidden_states"] = batch["negative_encoder_hidden_states"]
        out = fn(batch["latents"], torch.randn_like(batch["latents"]),
                 batch["encoder_hidden_states"], **extra)  # fmt: skip
        assert torch.isfinite(out["total"]) and counter.frame_count == 1
        # another iteration value: the same graph
        if name == "student":
            fn(batch["latents"], torch.randn_like(batch["latents"]), batch["encoder_hidden_states"],
               **{**extra, "iteration": torch.tensor(4)})  # fmt: skip
            assert counter.frame_count == 1


def test_a_discriminator_or_a_fake_score_the_method_lacks_is_refused(tmp_path):
    run = RunConfig(out=str(tmp_path), steps=1, recipe="scm_sd3")
    teacher = ToyDiT(dim=16, depth=2)
    with pytest.raises(ValueError, match="fake_score: scm trains none"):
        Trainer(run, teacher=teacher, fake_score=ToyDiT(dim=16, depth=2), data=Data())
    with pytest.raises(ValueError, match="discriminator: scm has no GAN branch"):
        Trainer(run, teacher=teacher, discriminator=torch.nn.Linear(2, 2), data=Data())


# --- MeanFlowNet ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_meanflow_net_starts_as_its_teacher_and_learns_r(tmp_path, family):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    teacher = build(family)
    net = MeanFlowNet(copy.deepcopy(teacher))
    data = samples(family, 2)
    kwargs = {"encoder_hidden_states": data["encoder_hidden_states"]}
    if family == "sd3":
        kwargs["pooled_projections"] = data["pooled_projections"]
    x = data["latents"]
    t = torch.tensor([0.7, 0.3]) * 1000
    want = teacher(hidden_states=x, timestep=t, **kwargs)[0]
    got = net(x, t, 0.25 * t, **kwargs)[0]
    assert torch.equal(got, want)  # the r embedding starts at zero: the teacher, bitwise
    got.square().mean().backward()
    grads = [p.grad for p in net.r_embedder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # once trained, r matters
        for p in net.r_embedder.parameters():
            p.add_(0.1)
    assert not torch.equal(net(x, t, 0.25 * t, **kwargs)[0], net(x, t, 0.5 * t, **kwargs)[0])
    net.save_pretrained(str(tmp_path / "mf"))
    back = MeanFlowNet.from_pretrained(str(tmp_path / "mf"), type(teacher))
    assert torch.equal(back(x, t, 0.25 * t, **kwargs)[0], net(x, t, 0.25 * t, **kwargs)[0])


def test_a_network_without_a_timestep_embedding_is_refused():
    with pytest.raises(ValueError, match="no diffusers timestep embedding"):
        MeanFlowNet(ToyDiT(dim=16, depth=2))


# --- the CLI on a tiny SD3 folder ----------------------------------------------------------


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_distill_by_recipe_exports_and_samples(tmp_path, method, capsys):
    pytest.importorskip("diffusers")
    over = {"ema": {"decay": 0.5}, "tangent_warmup_steps": 2}
    config = run_yaml(tmp_path, "sd3", recipe=f"{method}_sd3", dmd={}, **{method: over},
                      lora={"rank": 2, "target_modules": ["to_q", "to_v"]})  # fmt: skip
    assert main(["distill", config]) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps" in out and "exported the student" in out
    export = tmp_path / "run" / "export"
    settings = json.loads((export / "fastgen.json").read_text())
    assert settings["class_name"] == "SD3Transformer2DModel"
    assert settings["student_sample_type"] == ("meanflow" if method == "meanflow" else "sde")
    assert (export / "lora" / "adapter_config.json").is_file()
    assert (export / "transformer" / "r_embedder.safetensors").is_file() == (method == "meanflow")
    grid = tmp_path / "grid"
    code = main(["sample", "--student", str(export / "transformer"), "--cache",
                 str(tmp_path / "cache"), "--out", str(grid), "--samples", "3"])  # fmt: skip
    assert code == 0
    saved = torch.load(grid.with_suffix(".pt"))
    assert saved["samples"].shape[0] == 3 and torch.isfinite(saved["samples"]).all()
    assert saved["t_list"] == settings["t_list"]


def test_a_meanflow_lora_student_on_a_bf16_base_trains_its_r_embedding_in_float32(tmp_path):
    """With a bf16 teacher the LoRA base stays bf16, but MeanFlow's new embedding of t - r trains
    in float32 (it was a bf16 copy of the timestep MLP), like the adapters."""
    pytest.importorskip("diffusers")
    from fastgen.train import build as build_run

    config = yaml.safe_load(open(run_yaml(tmp_path, "sd3", recipe="meanflow_sd3", dmd={},
                                          lora={"rank": 2, "target_modules": ["to_q", "to_v"]})))  # fmt: skip
    config["teacher"]["dtype"], config["precision"] = "bfloat16", "bf16"
    trainer = build_run(RunConfig.model_validate(config))
    student = trainer.pipeline.student
    r_dtypes = {p.dtype for p in student.r_embedder.parameters()}
    assert r_dtypes == {torch.float32}
    assert all(p.requires_grad for p in student.r_embedder.parameters())
    base = [p for n, p in student.base.named_parameters() if "lora_" not in n]
    assert torch.bfloat16 in {p.dtype for p in base} and not any(p.requires_grad for p in base)
    before = [p.detach().clone() for p in student.r_embedder.parameters()]
    trainer.fit()  # and it trains
    after = list(student.r_embedder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.isfinite(p).all() for p in after)


def test_a_bad_field_of_the_methods_section_is_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    config = run_yaml(tmp_path, "sd3", recipe="meanflow_sd3", dmd={},
                      meanflow={"r_sample_ratio": 3})  # fmt: skip
    assert main(["distill", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meanflow.r_sample_ratio" in err[0]
