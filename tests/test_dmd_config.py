"""DMD2 configs and YAML recipes: defaults, cross-field rules, aliases, loading by name and path."""

from __future__ import annotations

import json

import pydantic
import pytest

import fastgen
from fastgen import DMDConfig, EMAConfig, SampleTimestepConfig, load_dmd_config


def test_bare_config_draws_from_the_shifted_family():
    cfg = DMDConfig()
    assert cfg.sample_t_cfg.time_dist_type == "shifted" and cfg.sample_t_cfg.shift == 5.0
    assert SampleTimestepConfig().time_dist_type == "uniform"  # fastgen's own default


def test_p_mean_p_std_are_aliases():
    cfg = SampleTimestepConfig(time_dist_type="logitnormal", p_mean=-0.5, p_std=2.0)
    assert (cfg.train_p_mean, cfg.train_p_std) == (-0.5, 2.0)
    assert (cfg.p_mean, cfg.p_std) == (-0.5, 2.0)
    assert cfg == SampleTimestepConfig(
        time_dist_type="logitnormal", train_p_mean=-0.5, train_p_std=2.0
    )
    with pytest.raises(pydantic.ValidationError, match="p_std"):
        SampleTimestepConfig(p_std=0.0)


@pytest.mark.parametrize("name", fastgen.list_recipes())
def test_builtin_recipes_load_and_round_trip(name, tmp_path):
    cfg = load_dmd_config(name)
    assert (
        cfg.student_sample_steps == 1
        or len(cfg.sample_t_cfg.t_list) == cfg.student_sample_steps + 1
    )
    path = tmp_path / "again.yaml"
    path.write_text(cfg.to_yaml())
    assert DMDConfig.from_yaml(path) == cfg
    (tmp_path / "again.json").write_text(cfg.model_dump_json())
    assert load_dmd_config(tmp_path / "again.json") == cfg
    assert load_dmd_config(tmp_path / "again") == cfg  # the suffix may be left out


def test_recipes_hold_their_published_numbers():
    wan = load_dmd_config("dmd2_wan21")
    assert wan.sample_t_cfg.t_list == (0.999, 0.937, 0.833, 0.624, 0.0)
    assert (wan.guidance_scale, wan.gan_loss_weight_gen, wan.num_train_timesteps) == (
        5.0,
        0.03,
        1000,
    )
    qwen = load_dmd_config("dmd2_qwen_image")
    assert qwen.guidance_scale is None and qwen.num_train_timesteps is None  # empty YAML values
    assert qwen.sample_t_cfg.t_list == (0.999, 0.74925, 0.4995, 0.24975, 0.0)
    sd3 = load_dmd_config("dmd2_sd3")
    assert sd3.sample_t_cfg.time_dist_type == "logitnormal" and sd3.guidance_scale == 7.0


def test_yaml_typo_names_the_field(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("pred_type: flow\nsample_t_cfg:\n  time_dist_typ: shifted\n")
    with pytest.raises(pydantic.ValidationError, match="time_dist_typ"):
        load_dmd_config(path)
    path.write_text("student_sample_steps: two\n")
    with pytest.raises(pydantic.ValidationError, match="student_sample_steps"):
        load_dmd_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_dmd_config(path)
    path.write_text("")
    assert load_dmd_config(path) == DMDConfig()


def test_configs_are_frozen_and_json_round_trip():
    cfg = DMDConfig(ema=EMAConfig(type="halflife"), guidance_scale=4.0)
    with pytest.raises(pydantic.ValidationError):
        cfg.guidance_scale = 1.0
    assert DMDConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"student_sample_steps": 3, "sample_t_cfg": {"t_list": [0.9, 0.5, 0.0]}}, "t_list"),
        ({"student_sample_steps": 1, "sample_t_cfg": {"t_list": [0.9, 0.5, 0.0]}}, "t_list"),
        ({"backward_simulation": True}, "backward_simulation"),
        ({"gan_r1_reg_weight": 1.0}, "gan_r1_reg_weight"),
        ({"gan_loss_weight_gen": -0.1}, "gan_loss_weight_gen"),
        ({"gan_r1_reg_alpha": 0.0}, "gan_r1_reg_alpha"),
        ({"student_update_freq": 0}, "student_update_freq"),
        ({"fake_score_pred_type": "velocity"}, "fake_score_pred_type"),
        ({"timestep_dtype": "bfloat16"}, "timestep_dtype"),
        ({"ema": {"rampup_ratio": 0.0}}, "rampup_ratio"),
        ({"ema": {"batch_size": 0}}, "batch_size"),
        ({"ema": {"dtype": "float64"}}, "dtype"),
    ],
)
def test_cross_field_and_bound_rules(kwargs, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        DMDConfig(**kwargs)


def test_to_yaml_keeps_the_declared_field_order():
    text = DMDConfig(guidance_scale=4.0).to_yaml()
    top = [line.split(":")[0] for line in text.splitlines() if line and not line[0].isspace()]
    assert top == list(DMDConfig.model_fields)
    assert top != sorted(top)  # the declared order is not the alphabetical one


def test_json_recipes_are_read_as_json(tmp_path):
    # 1e5 is a number in JSON and a string in YAML 1.1: the .json suffix decides the parser.
    (tmp_path / "r.json").write_text('{"guidance_scale": 1e5}')
    assert fastgen.load_config(tmp_path / "r.json") == {"guidance_scale": 100000.0}
    (tmp_path / "r.yaml").write_text("guidance_scale: 1e5\n")
    assert fastgen.load_config(tmp_path / "r.yaml") == {"guidance_scale": "1e5"}


def test_recipe_lookup_order_and_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A suffix-less name means the suffixed files: a suffix-less file of that name is not read.
    (tmp_path / "mine").write_text("- not a mapping\n")
    (tmp_path / "mine.yaml").write_text("guidance_scale: 2.5\n")
    assert load_dmd_config("mine").guidance_scale == 2.5
    # A built-in recipe's name with its suffix finds the built-in when no such file exists.
    assert load_dmd_config("dmd2_wan21.yaml") == load_dmd_config("dmd2_wan21")
    with pytest.raises(TypeError, match=r"^name_or_path must be a str or Path, got int$"):
        load_dmd_config(3)
    with pytest.raises(FileNotFoundError) as err:
        load_dmd_config("nothing")
    message = str(err.value)
    assert message.startswith("no recipe file 'nothing' (tried nothing.yaml, nothing.yml, ")
    assert ", ".join(fastgen.list_recipes()) in message
    (tmp_path / "list.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match=r"must hold a mapping of fields, got list$"):
        load_dmd_config("list")


def test_list_recipes_names_the_yaml_files_without_suffix():
    from pathlib import Path

    folder = Path(fastgen.__file__).parent / "dmd" / "recipes"
    names = sorted(p.name[: -len(".yaml")] for p in folder.glob("*.yaml"))
    assert names and fastgen.list_recipes() == names


def test_list_recipes_drops_only_the_last_suffix(tmp_path, monkeypatch):
    from fastgen.dmd import recipe_files

    for name in ("b.yaml", "a.v2.yaml", "c.yml", "notes.txt"):
        (tmp_path / name).write_text("")
    monkeypatch.setattr(recipe_files, "_BUILTIN", tmp_path)
    assert fastgen.list_recipes() == ["a.v2", "b"]
