"""``fastgen distill`` on diffusers model folders and latent caches, end to end: tiny SD3, Flux
and Wan transformers saved with save_pretrained, the family's built-in recipe, a resume, the
export loaded back with from_pretrained, and ``fastgen sample`` on it."""

from __future__ import annotations

import json

import pytest
import torch
from families import build, run_yaml

from fastgen.cli import main
from fastgen.train.folders import load_model

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("family", ["sd3", "flux", "wan", "qwen"])
def test_distill_a_model_folder_resume_export_and_sample(tmp_path, family, capsys):
    config = run_yaml(tmp_path, family)
    assert main(["distill", config]) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps" in out and "exported the student" in out
    # rerun with more steps: resumes from the last checkpoint, not from scratch
    assert main(["distill", config, "--set", "steps=3"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
    export = tmp_path / "run" / "export"
    settings = json.loads((export / "fastgen.json").read_text())
    cls = getattr(diffusers, settings["class_name"])
    student = cls.from_pretrained(str(export / "transformer"))
    assert type(student) is type(build(family))
    teacher = load_model(tmp_path / "teacher", subfolder="transformer")
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(student.state_dict().values(), teacher.state_dict().values())
    )
    assert changed  # the student trained
    capsys.readouterr()
    grid = tmp_path / "samples" / "grid"
    code = main(["sample", "--student", str(export / "transformer"), "--cache",
                 str(tmp_path / "cache"), "--out", str(grid), "--samples", "3"])  # fmt: skip
    assert code == 0
    saved = torch.load(grid.with_suffix(".pt"))
    assert saved["samples"].shape[0] == 3 and torch.isfinite(saved["samples"]).all()
    assert saved["t_list"] == settings["t_list"]
    assert grid.with_suffix(".png").is_file() == (family != "flux")  # packed tokens: no picture


def test_the_export_holds_the_ema_weights(tmp_path):
    from fastgen.cache import LatentCache
    from fastgen.train import Trainer, load_run_config
    from fastgen.train.folders import export_student, load_teacher

    run = load_run_config(run_yaml(tmp_path, "sd3", dmd={"gan_loss_weight_gen": 0.0,
                                                         "ema": {"decay": 0.5}}))  # fmt: skip
    data = LatentCache(run.data.cache, batch_size=2)
    trainer = Trainer(run, teacher=load_teacher(run.teacher), data=data)
    trainer.fit()
    ema = trainer.ema_student()
    folder = export_student(ema, run.out, trainer.dmd)
    loaded = load_model(folder / "transformer")
    for (name, a), b in zip(ema.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    shadow = trainer.pipeline.ema.state_dict()
    assert all(torch.equal(shadow[k], v) for k, v in loaded.state_dict().items() if k in shadow)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            loaded.state_dict().values(), trainer.pipeline.student.state_dict().values()
        )
    )  # the EMA, not the last student


# Runs `fastgen distill` in a subprocess; with a marker path, it touches the marker and sleeps
# at one point (in the save of step 2, or in the first update of a resumed iteration) for the
# test to SIGKILL it there.
_STALLED = """
import sys, time
from pathlib import Path
import fastgen.checkpoint as ckpt
from fastgen.cli import main
from fastgen.train import Trainer
where, marker = sys.argv[1], sys.argv[2]

def stall():
    Path(marker).touch()
    time.sleep(600)

if where == "save":
    write = ckpt._write
    def slow_write(path, data):
        write(path, data)
        if "step_00000002" in str(path) and path.name == "meta.json":
            stall()
    ckpt._write = slow_write
elif where == "step":
    update, calls = Trainer._update, []
    def slow_update(self, name, iteration):
        calls.append(name)
        if len(calls) == 2:  # after one update of the iteration: its state is half-changed
            stall()
        return update(self, name, iteration)
    Trainer._update = slow_update
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_distill_compiled_killed_in_a_save_and_in_a_step_resumes_bitwise(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    config = run_yaml(tmp_path, "sd3", compile=True, steps=3,
                      dmd={"student_update_freq": 2, "gan_loss_weight_gen": 0.0,
                           "ema": {"decay": 0.5}})  # fmt: skip

    def distill(out, where="none", marker=""):
        argv = [sys.executable, "-c", _STALLED, where, marker, "distill", config,
                "--set", f"out={out}"]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def exported(out):
        return load_file(
            str(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
        )

    straight = distill(tmp_path / "straight")
    stdout, err = straight.communicate(timeout=900)
    assert straight.returncode == 0, err
    assert "done: 3 steps" in stdout
    out = tmp_path / "killed"
    for where in ("save", "step"):
        marker = tmp_path / f"in_{where}"
        child = distill(out, where, str(marker))
        deadline = time.time() + 600
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.communicate()[1]
        child.send_signal(signal.SIGKILL)
        child.wait()
    # the save of step 2 never published; the kill in a step was after it (from step 1)
    assert fastgen_latest(out).name == "step_00000001"
    resumed = distill(out)
    stdout, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    assert "resumed from step 1" in stdout
    a, b = exported(tmp_path / "straight"), exported(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fastgen_latest(out):
    from fastgen import latest_checkpoint

    return latest_checkpoint(out / "checkpoints")


def _break_cache_without_latents(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "cache" / "shard_000.safetensors").unlink()
    save_file({"encoder_hidden_states": torch.zeros(2, 5, 16)},
              str(tmp_path / "cache" / "shard_000.safetensors"))  # fmt: skip


def _break_cache_batches(tmp_path):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2, 4, 8, 8), "encoder_hidden_states": torch.zeros(3, 5, 16)},
              str(tmp_path / "cache" / "shard_000.safetensors"))  # fmt: skip


def _empty_cache(tmp_path):
    for f in (tmp_path / "cache").iterdir():
        f.unlink()


def _rewrite_cache(tmp_path, change):
    from families import samples

    from fastgen.cache import write_shard

    for i in range(2):
        tensors = samples("sd3", 4, seed=i)
        change(i, tensors)
        write_shard(tmp_path / "cache" / f"shard_{i:03d}", tensors)


def _seven_channels(tmp_path):
    _rewrite_cache(tmp_path, lambda i, t: t.update(latents=torch.zeros(4, 7, 8, 8)))


def _odd_size(tmp_path):
    _rewrite_cache(tmp_path, lambda i, t: t.update(latents=torch.zeros(4, 4, 7, 8)))


def _text_width(tmp_path):
    _rewrite_cache(tmp_path, lambda i, t: t.update(encoder_hidden_states=torch.zeros(4, 5, 9)))


def _pooled_width(tmp_path):
    _rewrite_cache(tmp_path, lambda i, t: t.update(pooled_projections=torch.zeros(4, 3)))


def _nan_in_one_sample(tmp_path):
    def change(i, tensors):
        if i == 1:
            tensors["encoder_hidden_states"][2, 1, 3] = float("nan")

    _rewrite_cache(tmp_path, change)


def _teacher_without_config(tmp_path):
    (tmp_path / "teacher" / "transformer" / "config.json").unlink()


@pytest.mark.parametrize(
    "damage, extra, message",
    [
        (_empty_cache, [], "data.cache: cache folder .* holds no \\*.safetensors shard"),
        (None, ["--set", "data.cache=/nonexistent/cache"], "data.cache: no cache folder"),
        (_break_cache_without_latents, [], "shard_000.safetensors: no 'latents'"),
        (_break_cache_batches, [], "'encoder_hidden_states' has batch 3, 'latents' has 2"),
        (_teacher_without_config, [], "teacher: no config.json in .*transformer"),
        (
            _seven_channels,
            [],
            r"data.cache: 'latents' has per-sample shape \(7, 8, 8\), the "
            r"teacher takes \(4, 8, 8\) \(in_channels 4\)$",
        ),
        (
            _odd_size,
            [],
            r"data.cache: 'latents' has per-sample shape \(4, 7, 8\): the teacher's "
            r"patch_size \(2, 2\) does not divide its sizes \(7, 8\)$",
        ),
        (
            _text_width,
            [],
            r"'encoder_hidden_states' has per-sample shape \(5, 9\), the teacher "
            r"takes \(5, 16\) \(joint_attention_dim 16\)$",
        ),
        (
            _pooled_width,
            [],
            r"'pooled_projections' has per-sample shape \(3,\), the teacher "
            r"takes \(12,\) \(pooled_projection_dim 12\)$",
        ),
        (
            _nan_in_one_sample,
            [],
            r"non-finite value: 'encoder_hidden_states' of sample 2 of "
            r".*cache/shard_001.safetensors \(a batch of iteration [12]\)",
        ),
        (None, ["--set", "teacher.class=NoSuchModel"], "teacher: diffusers has no model class"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, damage, extra, message):
    import re

    config = run_yaml(tmp_path, "sd3")
    if damage is not None:
        damage(tmp_path)
    assert main(["distill", config, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_a_resumed_run_ends_bitwise_equal_to_a_straight_one(tmp_path):
    from safetensors.torch import load_file

    def exported(root, *runs):
        config = run_yaml(root, "sd3", steps=runs[0])
        for steps in runs:
            assert main(["distill", config, "--set", f"steps={steps}"]) == 0
        return load_file(str(root / "run" / "export" / "transformer" /
                             "diffusion_pytorch_model.safetensors"))  # fmt: skip

    straight = exported(tmp_path / "straight", 4)
    resumed = exported(tmp_path / "resumed", 1, 3, 4)  # the cache's position and RNG restored
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize(
    "extra",
    [{"parallel": "ddp"}, {"parallel": "fsdp2", "lora": {"rank": 4}}],
    ids=["ddp", "fsdp2-lora-gan"],
)
def test_distill_under_torchrun_reads_a_share_of_the_cache_per_rank(tmp_path, extra):
    """DDP, and FSDP2 with LoRA and the GAN branch (dmd2_sd3's), on a latent cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    # timed saves only (every_minutes): the ranks agree on them at each logging iteration
    config = run_yaml(tmp_path, "sd3", steps=2, checkpoint={"every": 1000, "every_minutes": 1e-6},
                      log={"every": 1, "progress": False, "tensorboard": False}, **extra)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastgen.cli", "distill", config],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("done: 2 steps") == 1  # rank 0 reports and exports
    meta = json.loads(
        (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").read_text()
    )
    assert meta["world_size"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "manifest.json").is_file()
    assert (tmp_path / "run" / "export" / "transformer" / "config.json").is_file()
    if "lora" in extra:  # the adapter alone too, and the GAN branch trained its discriminator
        assert (tmp_path / "run" / "export" / "lora" / "adapter_config.json").is_file()
        assert "discriminator" in meta["schedulers"]


def test_a_cache_shard_deleted_under_a_run_is_one_line_at_resume(tmp_path, capsys):
    # A running process keeps reading its memory-mapped shards; the rerun finds fewer samples.
    config = run_yaml(tmp_path, "sd3")
    assert main(["distill", config]) == 0
    (tmp_path / "cache" / "shard_001.safetensors").unlink()
    capsys.readouterr()
    assert main(["distill", config, "--set", "steps=3"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fastgen: error: the checkpoint's data position is for 8 samples; "
        f"{str(tmp_path / 'cache')!r} holds 4\n"
    )
