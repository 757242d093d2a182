"""fastgen.train.build: the library builds the run fastgen distill builds, bit for bit."""

from __future__ import annotations

import pytest
import yaml
from runs import differences
from test_train import final_state, write_config

from fastgen.cli import main
from fastgen.train import RunConfig, RunError, Trainer, build


def test_the_library_and_the_cli_build_and_run_the_same_run(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", steps=3)
    assert main(["distill", str(config), "--set", f"out={tmp_path / 'cli'}"]) == 0
    fields = yaml.safe_load(config.read_text()) | {"out": str(tmp_path / "lib")}
    trainer = build(RunConfig.model_validate(fields))
    assert isinstance(trainer, Trainer) and trainer.dmd.student_update_freq == 2
    trainer.fit()
    assert differences(final_state(tmp_path / "cli"), final_state(tmp_path / "lib")) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": None}, r"^teacher: required \(a diffusers model folder\)"),
        ({"data": None}, r"^data: required"),
        ({"model": "no_such_module:f"}, r"^model: cannot import 'no_such_module'"),
        ({"data": {"cache": "/nonexistent", "batch_size": 2}}, r"^data\.cache: "),
        ({"teacher": {"path": "/nonexistent"}, "model": None}, r"/nonexistent"),
    ],
)
def test_build_errors_name_the_key_or_path(tmp_path, fields, message):
    config = write_config(tmp_path / "run.yaml")
    run = RunConfig.model_validate(yaml.safe_load(config.read_text()) | fields)
    with pytest.raises(RunError, match=message):
        build(run)
