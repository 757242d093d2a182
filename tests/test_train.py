"""fastgen/train: the trainer resumes to the straight run bitwise, stops on a non-finite loss
without saving it, writes its logs and samples; fastgen/cli.py: one-line errors, exit codes, and
a run killed with SIGKILL that resumes to the straight run's weights."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from runs import differences, full
from toys import ToyDiT
from train_toys import Data, Interrupted, networks

import fastgen
from fastgen.cli import main
from fastgen.dmd.state import network_state
from fastgen.train import (
    NonFiniteDataError,
    NonFiniteLossError,
    RunConfig,
    Trainer,
    apply_overrides,
)

TESTS = Path(__file__).resolve().parent


def run_config(out, **kw) -> RunConfig:
    fields = {
        "out": str(out),
        "steps": 6,
        "recipe": "dmd2_wan21",  # CFG 5, 4-step student on its ladder
        "dmd": {"gan_loss_weight_gen": 0.0, "ema": {"decay": 0.9}, "student_update_freq": 2,
                "backward_simulation": True},
        "optim": {"warmup": 2, "student": {"lr": 1e-3, "schedule": "cosine"},
                  "fake_score": {"lr": 2e-3}},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 1, "progress": False},
    }  # fmt: skip
    for key, value in kw.items():
        fields[key] = value
    return RunConfig.model_validate(fields)


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, net in trainer.pipeline.networks().items():
        out |= {f"{name}.{k}": full(v).clone() for k, v in network_state(net).items()}
    out |= {
        f"ema.{k}": full(v).clone() for k, v in trainer.pipeline.ema.sharded_state_dict().items()
    }
    for name, opt in trainer.optimizers.items():
        for i, st in opt.state_dict()["state"].items():
            out |= {f"opt.{name}.{i}.{k}": full(v).clone() for k, v in st.items()}
    return out


def trainer(run: RunConfig, data: Data, seed: int = 0) -> Trainer:
    torch.manual_seed(0)
    nets = networks(run)
    if seed:  # another initial student and fake score: a resume must overwrite them
        torch.manual_seed(seed)
        nets |= {"student": ToyDiT(dim=16, depth=2), "fake_score": ToyDiT(dim=16, depth=2)}
    return Trainer(run, data=data, **nets)


@pytest.mark.parametrize("stop_at", [8, 13], ids=["mid-fake-phase", "mid-student-phase"])
def test_interrupted_run_resumes_to_the_straight_run_bitwise(tmp_path, stop_at, capsys):
    straight = trainer(run_config(tmp_path / "a"), Data())
    straight.fit()
    # 3 batches per iteration: call 8 is in iteration 3, after the step-2 checkpoint
    first = trainer(run_config(tmp_path / "b"), Data(stop_at=stop_at))
    with pytest.raises(Interrupted):
        first.fit()
    saved = fastgen.latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert saved is not None and saved.name == f"step_{(stop_at - 1) // 6 * 2:08d}"
    resumed = trainer(run_config(tmp_path / "b"), Data(), seed=5)
    result = resumed.fit()
    assert result["resumed_from"] == (stop_at - 1) // 6 * 2
    assert "resumed from step" in capsys.readouterr().out
    assert differences(state_of(straight), state_of(resumed)) == []
    # keep: the newest 2
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000006"]  # fmt: skip


def test_a_resume_under_other_conditions_says_so(tmp_path, capsys):
    trainer(run_config(tmp_path / "a", steps=2), Data()).fit()
    trainer(run_config(tmp_path / "a", steps=4), Data()).fit()
    assert "note:" not in capsys.readouterr().out  # the same conditions: nothing to say
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        t = trainer(run_config(tmp_path / "a", steps=6, compile=True, deterministic=False), Data())
        t.begin()  # resumes, says so, then ends before any step
        t.end()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "note: this resumed run may differ in the last bits from one that never stopped: " in out
    assert f"saved on {threads} CPU threads, resumed on {threads + 1}" in out
    assert "compiled with deterministic: false" in out


def test_fresh_starts_over(tmp_path, capsys):
    trainer(run_config(tmp_path / "a", steps=2), Data()).fit()
    again = trainer(run_config(tmp_path / "a", steps=2), Data())
    assert again.fit(fresh=True)["resumed_from"] == 0
    assert "resumed" not in capsys.readouterr().out


def test_nan_loss_stops_with_loss_and_iteration_and_saves_nothing_after(tmp_path):
    t = trainer(run_config(tmp_path / "a", log={"every": 1, "progress": False}), Data())
    real, calls = t.losses["fake_score"], []

    def poisoned(*args, **kwargs):  # call 9 is the first fake-score update of iteration 5
        calls.append(1)
        out = real(*args, **kwargs)
        return dict(out, total=out["total"] * float("nan")) if len(calls) >= 9 else out

    t.losses["fake_score"] = poisoned
    with pytest.raises(
        NonFiniteLossError, match=r"the fake_score loss is not finite \(NaN or inf\) at iteration 5"
    ) as err:
        t.fit()
    assert "step_00000004" in str(err.value)
    assert fastgen.latest_checkpoint(tmp_path / "a" / "checkpoints").name == "step_00000004"


def test_nan_data_stops_naming_the_key_and_sample_before_the_loss(tmp_path):
    # call 13 is the first fake-score batch of iteration 5 (3 batches per iteration)
    t = trainer(run_config(tmp_path / "a", log={"every": 1, "progress": False}), Data(nan_at=13))
    with pytest.raises(
        NonFiniteDataError,
        match=r"^the data holds a non-finite value: 'encoder_hidden_states' of sample 0 of the "
        r"batch \(a batch of iteration 5\); stopped without saving. The latest checkpoint is "
        r".*step_00000004$",
    ):
        t.fit()
    assert fastgen.latest_checkpoint(tmp_path / "a" / "checkpoints").name == "step_00000004"


def test_logs_and_validation_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_config(tmp_path / "a", steps=4, validation={"every": 2, "samples": 2})
    result = trainer(run, Data()).fit()
    assert result["scalars"]["lr/student"] == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4))
    )
    events = EventAccumulator(
        str(tmp_path / "a" / "tensorboard"), size_guidance={"images": 0}
    ).Reload()
    tags = events.Tags()
    for tag in (
        "loss/student/vsd",
        "loss/fake_score/total",
        "lr/student",
        "grad_norm/student",
        "time/seconds_per_iteration",
        "time/samples_per_second",
        "memory/peak_rss_gib",
    ):
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4]
    assert {"samples/1_step", "samples/4_step"} <= set(tags["images"])
    pngs = sorted(p.name for p in (tmp_path / "a" / "samples").glob("*.png"))
    assert pngs == ["step_00000002.png", "step_00000004.png"]
    # the samples are the EMA student's, through fastgen.sample
    t = trainer(run_config(tmp_path / "b", steps=4, validation={"every": 4, "samples": 2}), Data())
    t.fit()
    grids = torch.load(tmp_path / "b" / "samples" / "step_00000004.pt")
    noise, ehs = t._viewer.noise, t._viewer.ehs  # the first 2 conditions of a batch, drawn once
    assert noise.shape[0] == ehs.shape[0] == 2
    x = fastgen.sample(t.ema_student(), noise, [0.999, 0.0], mode="ode", pred_type="flow",
                       num_train_timesteps=t.dmd.num_train_timesteps,
                       encoder_hidden_states=ehs)  # fmt: skip
    from fastgen.train.images import image_grid

    assert torch.equal(grids["1_step"], image_grid(x.float()))
    written = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert RunConfig.model_validate(written) == t.run


def test_apply_overrides():
    fields = {"optim": {"student": {"lr": 1e-5}}, "steps": 3}
    got = apply_overrides(fields, ["optim.student.lr=2e-4", "optim.student.betas=[0.0, 0.99]",
                                   "dmd.guidance_scale=null", "compile=true", "out=run"])  # fmt: skip
    assert got == {"optim": {"student": {"lr": 2e-4, "betas": [0.0, 0.99]}}, "steps": 3,
                   "dmd": {"guidance_scale": None}, "compile": True, "out": "run"}  # fmt: skip
    assert fields == {"optim": {"student": {"lr": 1e-5}}, "steps": 3}  # not modified
    for bad in ("optim.lr", "=3", "a..b=1"):
        with pytest.raises(ValueError, match=r"expected key\.sub=value"):
            apply_overrides({}, [bad])


# --- the CLI ---------------------------------------------------------------------------------


def write_config(path: Path, **fields) -> Path:
    base = {"out": str(path.parent / "run"), "steps": 4, "recipe": "dmd2_wan21",
            "model": "train_toys:networks", "data": "train_toys:data",
            "dmd": {"gan_loss_weight_gen": 0.0, "ema": {"decay": 0.9}, "student_update_freq": 2},
            "checkpoint": {"every": 1}, "log": {"every": 1, "progress": False}}  # fmt: skip
    base.update(fields)
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize(
    ("fields", "sets", "message"),
    [
        ({"stepz": 3}, [], r"run.yaml: stepz: Extra inputs are not permitted"),
        ({"steps": 0}, [], r"run.yaml: steps: Input should be greater than or equal to 1"),
        ({}, ["optim.student.lr=-1"], r"run.yaml: optim.student.lr: Input should be greater than 0"),
        ({}, ["dmd.guidance_scal=2"], r"run.yaml: dmd.guidance_scal: Extra inputs are not permitted"),
        ({}, ["optim"], r"--set 'optim': expected key.sub=value"),
        ({"recipe": "nope"}, [], r"recipe: no recipe file 'nope'"),
        ({"model": "no_such_module:f"}, [], r"model: cannot import 'no_such_module'"),
        ({"data": "train_toys:nothing"}, [], r"data: 'train_toys' has no function 'nothing'"),
        ({"model": None}, [], r"teacher: required \(a diffusers model folder\), or model:"),
        ({}, ["parallel=ddp"], r"run.yaml: parallel: ddp runs under torchrun"),
    ],
    ids=["unknown-key", "bad-value", "bad-set-value", "dmd-typo", "bad-set", "recipe", "import",
         "attr", "no-model", "ddp-without-torchrun"],
)  # fmt: skip
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, fields, sets, message):
    config = write_config(tmp_path / "run.yaml", **fields)
    args = ["distill", str(config)] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastgen: error: "), err
    import re

    assert re.search(message, err), err
    assert "Traceback" not in err


def test_cli_missing_config_path(tmp_path, capsys):
    assert main(["distill", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"fastgen: error: no run config file '{tmp_path / 'nope.yaml'}'"


def test_cli_recipes(capsys):
    assert main(["recipes"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("    ")]
    dmd2 = [h for h in heads if " [dmd2]" in h]
    assert [h.split(" [")[0] for h in dmd2] == fastgen.list_recipes()
    assert "modelopt" in dmd2[fastgen.list_recipes().index("dmd2_qwen_image")]


def cli(*args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, "-m", "fastgen.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip


def final_state(out: Path) -> dict[str, torch.Tensor]:
    t = trainer(RunConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text())), Data())
    fastgen.load_checkpoint(fastgen.latest_checkpoint(out / "checkpoints"), pipeline=t.pipeline,
                            optimizers=t.optimizers, schedulers=t.schedulers)  # fmt: skip
    return state_of(t)


def test_cli_sigkill_twice_then_resume_equals_the_straight_run(tmp_path):
    config = write_config(tmp_path / "run.yaml", steps=8)
    straight = cli("distill", str(config), "--set", f"out={tmp_path / 'straight'}")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    killed_out = tmp_path / "killed"
    seen = []
    for wait_for in (2, 5):  # kill after the 2nd and after the 5th checkpoint appeared
        child = cli("distill", str(config), "--set", f"out={killed_out}")
        deadline = time.time() + 120
        while time.time() < deadline:
            last = fastgen.latest_checkpoint(killed_out / "checkpoints")
            if last is not None and int(last.name.split("_")[1]) >= wait_for:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        seen.append(fastgen.latest_checkpoint(killed_out / "checkpoints").name)
    resumed = cli("distill", str(config), "--set", f"out={killed_out}")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from step" in out
    assert differences(final_state(tmp_path / "straight"), final_state(killed_out)) == []
    assert seen[0] < seen[1]


def test_cli_sigterm_saves_after_the_iteration_exits_75_and_the_rerun_resumes_bitwise(tmp_path):
    # Data that takes 50 ms a batch (the same batches): SIGTERM meets the run mid-iteration.
    config = write_config(tmp_path / "run.yaml", steps=30, data="train_toys:slow_data",
                          checkpoint={"every": 1000})  # fmt: skip
    straight = cli("distill", str(config), "--set", f"out={tmp_path / 'straight'}")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    out = tmp_path / "stopped"
    child = cli("distill", str(config), "--set", f"out={out}")
    deadline = time.time() + 120
    while not (out / "tensorboard").exists() and time.time() < deadline:
        time.sleep(0.05)  # the loop has begun (the handlers are in place)
    time.sleep(1.0)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == fastgen.train.EXIT_PREEMPTED == 75, err
    saved = fastgen.latest_checkpoint(out / "checkpoints")
    assert saved is not None and 0 < int(saved.name.split("_")[1]) < 30  # not a scheduled save
    assert (
        err
        == f"fastgen: stopped by SIGTERM after iteration {int(saved.name[5:])}; saved {saved}; rerun the same command to resume\n"
    )
    resumed = cli("distill", str(config), "--set", f"out={out}")
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from step {int(saved.name[5:])}" in stdout
    assert differences(final_state(tmp_path / "straight"), final_state(out)) == []


def test_cli_a_damaged_checkpoint_at_resume_is_one_line_naming_the_file(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", steps=2)
    assert main(["distill", str(config)]) == 0
    newest = fastgen.latest_checkpoint(tmp_path / "run" / "checkpoints")
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["distill", str(config), "--set", "steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastgen: error: ") and shard.name in err, err


def test_cli_a_full_disk_during_a_save_is_one_line_and_leaves_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    import errno

    import fastgen.checkpoint as ckpt

    real, writes = ckpt._write, []

    def write(path, data):  # the disk fills up during the third save
        writes.append(path)
        if "step_00000003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write", write)
    config = write_config(tmp_path / "run.yaml", steps=4)
    assert main(["distill", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(
        "step_00000003.tmp/rng/rank_00000.pt: No space left on device\n"
    ), err
    last = fastgen.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "step_00000002"
    monkeypatch.setattr(ckpt, "_write", real)  # space again: the rerun resumes from it
    assert main(["distill", str(config)]) == 0
    assert "resumed from step 2" in capsys.readouterr().out


def test_cli_an_unusable_run_folder_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    config = write_config(tmp_path / "run.yaml", out=str(tmp_path / "file" / "run"))
    assert main(["distill", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"fastgen: error: {tmp_path / 'file' / 'run'}: Not a directory\n"


def test_a_second_notice_ends_the_process_at_once():
    code = (
        "import os, signal, time\n"
        "from fastgen.train import PreemptionNotice\n"
        "with PreemptionNotice(('SIGUSR1',)) as n:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(0.1)\n"
        "    print(n.received, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(0.1)\n"
        "    print('still here')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGUSR1 and proc.stdout == "SIGUSR1\n", proc


def test_every_minutes_saves_on_the_clock(tmp_path):
    run = run_config(
        tmp_path / "a", checkpoint={"every": 1000, "keep": None, "every_minutes": 1e-6}
    )
    trainer(run, Data()).fit()
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == [f"step_{i:08d}" for i in range(1, 7)]
    run = run_config(tmp_path / "b", checkpoint={"every": 1000, "keep": None, "every_minutes": 60})
    trainer(run, Data()).fit()
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_00000006"]


def test_the_run_configs_of_the_guide_and_the_readme_are_valid():
    import re

    guide = (TESTS.parent / "docs" / "guides" / "trainer.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", guide, flags=re.S) if "recipe:" in b]
    run = RunConfig.model_validate(yaml.safe_load(block))
    assert run.dmd_config().guidance_scale == 4.0
    assert run.optim.student.schedule == "cosine"
    readme = (TESTS.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "recipe:" in b]
    assert RunConfig.model_validate(yaml.safe_load(block)).dmd_config().student_sample_steps == 4


def test_bf16_autocast_runs_the_networks_in_bf16_and_keeps_float32_weights(tmp_path):
    t = trainer(run_config(tmp_path / "a", steps=1, precision="bf16"), Data())
    seen = []
    t.pipeline.student.proj_in.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    result = t.fit()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in t.pipeline.student.parameters())
    assert all(math.isfinite(v) for k, v in result["scalars"].items() if k.startswith("loss/"))
