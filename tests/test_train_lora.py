"""LoRA students (peft) through the trainer: only the adapters train, the export merges them
(a plain diffusers model) and saves the adapter alone in peft's format."""

from __future__ import annotations

import pytest
import torch
from families import run_yaml, samples

from fastgen.cli import main
from fastgen.train import Trainer, load_run_config
from fastgen.train.folders import export_student, load_model, load_teacher

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
