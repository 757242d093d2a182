"""LoRA students (peft) through the trainer: only the adapters train, the export merges them
(a plain diffusers model) and saves the adapter alone in peft's format."""

from __future__ import annotations

import pytest
import torch
from families import run_yaml, samples

from fastgen.cli import main
from fastgen.train import Trainer, load_run_config
from fastgen.train.folders import export_student, load_model, load_teacher
from fastgen.train.lora import has_lora

peft = pytest.importorskip("peft")


def lora_trainer(tmp_path, **lora):
    from fastgen.cache import LatentCache

    path = run_yaml(tmp_path, "sd3", lora={"rank": 4, **lora},
                    dmd={"gan_loss_weight_gen": 0.0, "ema": {"decay": 0.5}})  # fmt: skip
    run = load_run_config(path)
    teacher = load_teacher(run.teacher)
    return Trainer(run, teacher=teacher, data=LatentCache(run.data.cache, batch_size=2)), run


def call(net, batch):
    kwargs = {k: v for k, v in batch.items() if not k.startswith("negative_") and k != "latents"}
    with torch.no_grad():
        return net(hidden_states=batch["latents"], timestep=torch.full((2,), 500.0),
                   **kwargs).sample  # fmt: skip


def test_only_the_adapters_train(tmp_path):
    trainer, _ = lora_trainer(tmp_path)
    student = trainer.pipeline.student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    total = sum(p.numel() for p in student.parameters())
    adapters = sum(p.numel() for p in trainer._params["student"])
    assert 0 < adapters < total / 5
    trainer.fit()
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed)  # base weights untouched
    assert any("lora_B" in k for k in changed)  # B starts at 0 and moved
    for name, opt in trainer.optimizers.items():
        n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
        assert n_opt == sum(p.numel() for p in trainer._params[name])


def test_export_merges_the_adapter_and_saves_it_alone(tmp_path):
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    trainer, run = lora_trainer(tmp_path)
    trainer.fit()
    ema = trainer.ema_student()
    folder = export_student(ema, run.out, trainer.dmd)
    batch = samples("sd3", 2, seed=5)
    expected = call(ema, batch)
    merged = load_model(folder / "transformer")
    assert not any("lora" in k for k in merged.state_dict())  # a plain diffusers model
    torch.testing.assert_close(call(merged, batch), expected, rtol=1e-5, atol=1e-5)
    # the adapter alone, in peft's format, on a fresh copy of the teacher
    assert {p.name for p in (folder / "lora").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"}  # fmt: skip
    config = peft.LoraConfig.from_pretrained(str(folder / "lora"))
    fresh = load_teacher(run.teacher)
    peft.inject_adapter_in_model(config, fresh)
    result = set_peft_model_state_dict(
        fresh, load_file(str(folder / "lora" / "adapter_model.safetensors"))
    )
    assert not result.unexpected_keys
    torch.testing.assert_close(call(fresh, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux", "wan", "qwen"])
def test_cli_with_lora_on_every_family(tmp_path, family):
    config = run_yaml(tmp_path, family, lora={"rank": 2})
    assert main(["distill", config]) == 0
    assert main(["distill", config, "--set", "steps=3"]) == 0  # resumed
    export = tmp_path / "run" / "export"
    assert (export / "lora" / "adapter_model.safetensors").is_file()
    merged = load_model(export / "transformer")
    assert not any("lora" in k for k in merged.state_dict())


def test_cli_with_an_unknown_lora_target(tmp_path, capsys):
    config = run_yaml(tmp_path, "sd3", lora={"rank": 2})
    assert main(["distill", config]) == 0
    capsys.readouterr()
    assert main(["distill", config, "--fresh", "--set", "lora.target_modules=[nope]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.target_modules ['nope']" in err[0], err


def _base(net):
    return {n.replace(".base_layer", ""): p for n, p in net.named_parameters() if "lora_" not in n}


def test_one_base_shared_by_teacher_student_and_fake_score(tmp_path):
    from fastgen.train import build

    run = load_run_config(run_yaml(tmp_path, "sd3", lora={"rank": 4},
                                   dmd={"gan_loss_weight_gen": 0.0, "ema": {"decay": 0.5}}))  # fmt: skip
    trainer = build(run)
    teacher = trainer.pipeline.teacher
    plain = load_teacher(run.teacher)
    batch = samples("sd3", 2, seed=3)
    before = call(plain, batch)
    assert torch.equal(call(teacher, batch), before)  # the teacher carries no adapter
    assert not has_lora(teacher)
    own = dict(teacher.named_parameters())
    for name in ("student", "fake_score"):
        base = _base(getattr(trainer.pipeline, name))
        assert base.keys() == own.keys()
        assert all(base[k] is own[k] for k in own)  # the same tensors, not copies
    # the run's distinct weight storage: the base once, plus each network's adapters
    nets = [teacher, trainer.pipeline.student, trainer.pipeline.fake_score]
    storages = {p.untyped_storage().data_ptr(): p.nbytes for n in nets for p in n.parameters()}
    adapters = sum(p.nbytes for p in (*trainer._params["student"], *trainer._params["fake_score"]))
    base_bytes = sum(p.nbytes for p in teacher.parameters())
    assert sum(storages.values()) == base_bytes + adapters
    assert set(trainer.pipeline.ema.state_dict()) == {
        n for n, p in trainer.pipeline.student.named_parameters() if p.requires_grad
    }
    trainer.fit()
    assert torch.equal(call(teacher, batch), before)  # untouched by two trained adapters
    for k, p in plain.named_parameters():
        assert torch.equal(own[k], p), k


def test_each_loss_reaches_only_its_adapter(tmp_path):
    trainer, _ = lora_trainer(tmp_path)
    pipe = trainer.pipeline
    for loss in ("student", "fake_score"):
        for net in (pipe.teacher, pipe.student, pipe.fake_score):
            for p in net.parameters():
                p.grad = None
        latents, ehs, kwargs, negative = trainer._batch()
        extra = {}
        if loss == "student":  # the guided teacher's unconditional call
            extra["negative_encoder_hidden_states"] = negative.pop("encoder_hidden_states")
            if negative:
                extra["negative_model_kwargs"] = negative
        out = trainer.losses[loss](latents, torch.randn_like(latents), ehs, **extra, **kwargs)
        out["total"].backward()
        trained = getattr(pipe, loss)
        other = pipe.fake_score if loss == "student" else pipe.student
        grads = [p.grad for n, p in trained.named_parameters() if "lora_" in n]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in other.parameters()), loss
        assert all(p.grad is None for p in pipe.teacher.parameters()), loss


def test_lora_checkpoints_hold_the_adapters_only_and_resume_bitwise(tmp_path):
    import torch.distributed.checkpoint as dcp

    from fastgen.train import build

    def trained(out, steps):
        path = run_yaml(tmp_path, "sd3", lora={"rank": 4}, out=str(out), steps=steps,
                        dmd={"gan_loss_weight_gen": 0.0, "ema": {"decay": 0.5}})  # fmt: skip
        trainer = build(load_run_config(path))
        trainer.fit()
        return trainer

    straight = trained(tmp_path / "a", 4)
    trained(tmp_path / "b", 2)
    resumed = trained(tmp_path / "b", 4)
    step2 = tmp_path / "b" / "checkpoints" / "step_00000002"
    keys = dcp.FileSystemReader(str(step2)).read_metadata().state_dict_metadata
    nets = [k for k in keys if k.startswith(("pipeline.student.", "pipeline.fake_score.",
                                             "pipeline.ema."))]  # fmt: skip
    assert nets and all("lora_" in k for k in nets), [k for k in nets if "lora_" not in k][:3]
    for name in ("student", "fake_score"):
        a = getattr(straight.pipeline, name).state_dict()
        b = getattr(resumed.pipeline, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = straight.pipeline.ema.state_dict(), resumed.pipeline.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bfloat16_base_trains_float32_adapters(tmp_path):
    from fastgen.train import build
    from fastgen.train.lora import merged

    path = run_yaml(tmp_path, "sd3", lora={"rank": 4}, precision="bf16", optim={"student": {"lr": 0.05}},
                    dmd={"gan_loss_weight_gen": 0.0, "ema": {"decay": 0.5}})  # fmt: skip
    run = load_run_config(path)
    run = run.model_copy(update={"teacher": run.teacher.model_copy(update={"dtype": "bfloat16"})})
    trainer = build(run)
    student = trainer.pipeline.student
    assert {p.dtype for n, p in student.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in trainer._params["student"]} == {torch.float32}
    trainer.fit()
    ema = trainer.ema_student()
    plain = merged(ema)
    layer = ema.transformer_blocks[0].attn.to_q
    with torch.no_grad():
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        delta = delta * layer.scaling["default"]
    base = layer.base_layer.weight
    got = plain.transformer_blocks[0].attn.to_q.weight
    assert got.dtype == torch.bfloat16 and delta.abs().max() > 0
    assert not torch.equal(got, base)  # the adapter moved the weight by more than rounding
    # W + delta, the float32 sum rounded once to bfloat16 (W is exact in float32)
    torch.testing.assert_close(got, (base.float() + delta).to(torch.bfloat16), rtol=0, atol=0)
    # the export's merged copy shares the frozen weights instead of copying them
    assert plain.pos_embed.proj.weight is trainer.pipeline.teacher.pos_embed.proj.weight
