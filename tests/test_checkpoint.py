"""fastgen/checkpoint.py: a resumed DMD2 run is bitwise the straight run; saves are atomic and
verified; a damaged or mismatched checkpoint is a CheckpointError that names the file or key and
leaves the live state untouched."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import FREQ, build, differences, snapshot, train
from toys import ToyDiT

import fastgen
from fastgen import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

STEPS = 2 * FREQ + 2  # two student updates, then two fake-score updates


def save(run, path, step, extra=None):
    return save_checkpoint(path, pipeline=run.pipe, optimizers=run.optimizers,
                           schedulers=run.schedulers, step=step, extra=extra)  # fmt: skip


def load(run, path):
    return load_checkpoint(path, pipeline=run.pipe, optimizers=run.optimizers,
                           schedulers=run.schedulers)  # fmt: skip


def straight_and_resumed(tmp_path, stop, **kw):
    torch.manual_seed(1)
    straight = build(0, **kw)
    train(straight, 0, STEPS)
    torch.manual_seed(1)
    first = build(0, **kw)
    train(first, 0, stop)
    path = save(first, tmp_path / f"step_{stop}", stop, extra={"position": stop})
    after_save = snapshot(first)
    del first
    torch.manual_seed(12345)  # another RNG state, other initial weights
    resumed = build(7, **kw)
    assert differences(snapshot(resumed), after_save)  # the rebuilt run starts elsewhere
    info = load(resumed, path)
    assert (info.step, info.extra, info.world_size) == (stop, {"position": stop}, 1)
    assert not differences(snapshot(resumed), after_save)
    train(resumed, info.step, STEPS)
    return snapshot(straight), snapshot(resumed)


# mid fake-score phase (one of the FREQ - 1 done), and right after a student update
@pytest.mark.parametrize("stop", [FREQ + 1, 2 * FREQ])
@pytest.mark.parametrize("gan", [False, True], ids=["vsd", "gan"])
def test_resumed_run_is_bitwise_the_straight_run(tmp_path, stop, gan):
    straight, resumed = straight_and_resumed(tmp_path, stop, gan=gan)
    assert any(k.startswith("ema.") for k in straight) and any(".exp_avg" in k for k in straight)
    if gan:
        assert any(k.startswith("discriminator.") for k in straight)
    assert differences(straight, resumed) == []


def test_resumed_run_is_bitwise_with_compiled_losses(tmp_path):
    straight, resumed = straight_and_resumed(tmp_path, FREQ + 1, compile_backend="aot_eager")
    assert differences(straight, resumed) == []


def test_resume_restores_every_rng():
    import tempfile

    run = build(0)
    random.seed(3)
    np.random.seed(4)  # noqa: NPY002 (the legacy global RNG is what is saved)
    torch.manual_seed(5)
    with tempfile.TemporaryDirectory() as root:
        path = save(run, Path(root) / "ckpt", 0)
        expected = (random.random(), float(np.random.rand()), torch.rand(3))  # noqa: NPY002
        random.seed(0)
        np.random.seed(0)  # noqa: NPY002
        torch.manual_seed(0)
        info = load(run, path)
    assert info.rng_restored
    got = (random.random(), float(np.random.rand()), torch.rand(3))  # noqa: NPY002
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_checkpoint_files_and_meta(tmp_path):
    run = build(0, gan=True)
    train(run, 0, FREQ)
    path = save(run, tmp_path / "step_3", 3, extra={"note": "x"})
    names = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert {".metadata", "manifest.json", "meta.json", "config.yaml", "rng/rank_00000.pt"} <= names
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["fastgen_version"] == fastgen.__version__ and meta["step"] == 3
    assert meta["sections"] == ["discriminator", "ema", "fake_score", "student"]
    assert (
        fastgen.DMDConfig.model_validate(
            __import__("yaml").safe_load((path / "config.yaml").read_text())
        )
        == run.pipe.config
    )
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_latest_checkpoint_by_step_ignores_temporaries_and_incomplete(tmp_path):
    run = build(0)
    assert latest_checkpoint(tmp_path) is None
    save(run, tmp_path / "b", 20)
    save(run, tmp_path / "a", 10)
    assert latest_checkpoint(tmp_path) == tmp_path / "b"  # by step, not by name or time
    (tmp_path / ".c.tmp").mkdir()  # a save killed before it published (manifest included)
    (tmp_path / ".c.tmp" / "manifest.json").write_text(
        json.dumps({"format": "fastgen-checkpoint", "step": 99, "files": {}})
    )
    (tmp_path / "d").mkdir()  # no manifest: incomplete
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text("{trunc")
    assert latest_checkpoint(tmp_path) == tmp_path / "b"


def test_a_save_that_dies_before_publishing_leaves_the_previous_state(tmp_path, monkeypatch):
    run = build(0)
    save(run, tmp_path / "step_1", 1)
    real = os.replace

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        save(run, tmp_path / "step_2", 2)
    monkeypatch.setattr(os, "replace", real)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    save(run, tmp_path / "step_2", 2)  # the stale temporary is cleared
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert not list(tmp_path.glob(".*"))


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    run = build(0)
    save(run, tmp_path / "ckpt", 1)
    with torch.no_grad():
        for p in run.pipe.student.parameters():
            p.add_(1.0)
    save(run, tmp_path / "ckpt", 2)
    other = build(7)
    assert load(other, tmp_path / "ckpt").step == 2
    assert differences(snapshot(other), snapshot(run)) == []


KILL_CHILD = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from runs import build
import fastgen
root = {root!r}
run = build(0)
last = fastgen.latest_checkpoint(root)
step = 0 if last is None else fastgen.load_checkpoint(last, pipeline=run.pipe).step
print("ready", flush=True)
while True:
    step += 1
    with torch.no_grad():
        for p in run.pipe.student.parameters():
            p.fill_(float(step))
    fastgen.save_checkpoint(f"{{root}}/step_{{step:06d}}", pipeline=run.pipe, step=step)
    old = f"{{root}}/step_{{step - 3:06d}}"
    import shutil, os
    if os.path.isdir(old):
        shutil.rmtree(old)
"""


def test_sigkill_at_random_moments_never_leaves_a_bad_latest(tmp_path):
    root = tmp_path / "run"
    code = KILL_CHILD.format(tests=str(Path(__file__).parent), root=str(root))
    rng = random.Random(0)
    seen = []
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        last = latest_checkpoint(root)
        assert last is not None
        run = build(7)
        step = load_checkpoint(last, pipeline=run.pipe).step
        for p in run.pipe.student.parameters():  # the state of its own step
            assert torch.all(p == float(step))
        seen.append(step)
    assert seen == sorted(seen) and seen[-1] > seen[0]  # each run resumed and saved more


# --- damaged and mismatched checkpoints ---------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    run = build(0, gan=True)
    train(run, 0, FREQ)
    return save(run, tmp_path / "ckpt", FREQ)


def live_state(run):
    return (
        snapshot(run),
        torch.get_rng_state().clone(),
        {k: len(o.state) for k, o in run.optimizers.items()},
    )


def assert_untouched(run, before):
    state, rng, sizes = before
    assert differences(snapshot(run), state) == []
    assert torch.equal(torch.get_rng_state(), rng)
    assert {k: len(o.state) for k, o in run.optimizers.items()} == sizes


def distcp(path):
    return next(p for p in path.iterdir() if p.suffix == ".distcp")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_rng", "delete_meta"])
def test_damaged_file_is_named_and_nothing_is_loaded(saved, damage):
    if damage == "truncate":
        victim = distcp(saved)
        victim.write_bytes(victim.read_bytes()[:-100])
        match = "damaged: .* bytes"
    elif damage == "flip":
        victim = distcp(saved)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        match = "SHA-256 does not match"
    elif damage == "delete_rng":
        victim = saved / "rng" / "rank_00000.pt"
        victim.unlink()
        match = "is missing"
    else:
        victim = saved / "meta.json"
        victim.unlink()
        match = "is missing"
    run = build(7, gan=True)
    before = live_state(run)
    with pytest.raises(CheckpointError, match=match) as err:
        load(run, saved)
    assert str(victim) in str(err.value)
    assert_untouched(run, before)


def test_damaged_or_missing_manifest(saved):
    run = build(7, gan=True)
    (saved / "manifest.json").write_text('{"format": "fastgen-checkpoint", "st')
    with pytest.raises(CheckpointError, match=r"manifest.json is damaged"):
        load(run, saved)
    (saved / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest.json is missing"):
        load(run, saved)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load(run, saved / "nope")


def swap_student(run, net):
    from fastgen import DMDPipeline

    run.pipe = DMDPipeline(net, run.pipe.teacher, run.pipe.fake_score, run.pipe.config,
                           discriminator=run.pipe.discriminator)  # fmt: skip
    run.optimizers["student"] = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.99))
    run.schedulers["student"] = torch.optim.lr_scheduler.LinearLR(
        run.optimizers["student"], 0.25, total_iters=3
    )


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (lambda: ToyDiT(dim=16, depth=3), r"student does not match: missing keys \['transformer_blocks.2"),
        (lambda: ToyDiT(dim=16, depth=1), r"student does not match: unexpected keys \['transformer_blocks.1"),
        (lambda: ToyDiT(dim=16, depth=2, cond_dim=4), r"student: key 'context.weight' has shape \(16, 8\) in the checkpoint, \(16, 4\)"),
    ],
    ids=["unexpected", "missing", "shape"],
)  # fmt: skip
def test_mismatched_network_names_network_and_key(saved, net, match):
    run = build(7, gan=True)
    swap_student(run, net())
    before = live_state(run)
    with pytest.raises(CheckpointError, match=match):
        load(run, saved)
    assert_untouched(run, before)


def test_discriminator_in_one_and_not_the_other(saved, tmp_path):
    run = build(7, gan=False)
    before = live_state(run)
    with pytest.raises(CheckpointError, match="holds a discriminator but the pipeline has none"):
        load(run, saved)
    assert_untouched(run, before)
    plain = save(build(0), tmp_path / "plain", 0)
    run = build(7, gan=True)
    before = live_state(run)
    with pytest.raises(
        CheckpointError, match=r"the pipeline has a discriminator but .* holds none"
    ):
        load(run, plain)
    assert_untouched(run, before)


def test_optimizer_mismatches(saved):
    run = build(7, gan=True)
    before = live_state(run)
    with pytest.raises(
        CheckpointError,
        match=r"has no optimizer 'gen' \(it has \['discriminator', 'fake_score', 'student'\]\)",
    ):
        load_checkpoint(saved, pipeline=run.pipe, optimizers={"gen": run.optimizers["student"]})
    with pytest.raises(
        CheckpointError,
        match=r"optimizers\['fake_score'\] updated the fake_score there, here the student",
    ):
        load_checkpoint(
            saved, pipeline=run.pipe, optimizers={"fake_score": run.optimizers["student"]}
        )
    sgd = torch.optim.SGD(run.pipe.student.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="another optimizer class"):
        load_checkpoint(saved, pipeline=run.pipe, optimizers={"student": sgd})
    assert not sgd.state  # the state made to load into is undone
    with pytest.raises(CheckpointError, match="has no scheduler 'warmup'"):
        load_checkpoint(saved, pipeline=run.pipe, schedulers={"warmup": run.schedulers["student"]})
    assert_untouched(run, before)


def test_save_argument_errors(tmp_path):
    run = build(0)
    with pytest.raises(TypeError, match="pipeline must be a DMDPipeline"):
        save_checkpoint(tmp_path / "x", pipeline=object(), step=0)
    with pytest.raises(TypeError, match="step must be an int >= 0"):
        save_checkpoint(tmp_path / "x", pipeline=run.pipe, step=-1)
    with pytest.raises(TypeError, match="step must be an int >= 0"):
        save_checkpoint(tmp_path / "x", pipeline=run.pipe, step=True)
    with pytest.raises(TypeError, match="extra must be JSON data"):
        save_checkpoint(tmp_path / "x", pipeline=run.pipe, step=0, extra={"t": torch.ones(1)})
    with pytest.raises(TypeError, match=r"optimizers\['a'\] must be a torch.optim.Optimizer"):
        save_checkpoint(tmp_path / "x", pipeline=run.pipe, step=0, optimizers={"a": 1})
    teacher_opt = torch.optim.SGD(run.pipe.teacher.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"optimizers\['t'\] updates parameters that are not all in one"
    ):
        save_checkpoint(tmp_path / "x", pipeline=run.pipe, step=0, optimizers={"t": teacher_opt})
    assert not (tmp_path / "x").exists()


# --- DMDPipeline.state_dict / load_state_dict ----------------------------------------------


def test_pipeline_state_dict_round_trip_and_strictness():
    a, b = build(0, gan=True), build(7, gan=True)
    train(a, 0, FREQ)
    state = a.pipe.state_dict()
    assert set(state) == {
        "student",
        "fake_score",
        "discriminator",
        "ema",
        "ema_initialized",
        "iteration",
    }
    assert state["iteration"] == 1 and state["ema_initialized"] is True
    b.pipe.load_state_dict(state)
    for name in ("student", "fake_score", "discriminator"):
        got, want = b.pipe.state_dict()[name], state[name]
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert b.pipe._iteration == 1
    bad = dict(state, student={k: v for k, v in state["student"].items() if k != "proj_in.bias"})
    with pytest.raises(
        CheckpointError, match=r"student does not match: missing keys \['proj_in.bias'\]"
    ):
        b.pipe.load_state_dict(bad)
    b.pipe.load_state_dict(bad, strict=False)  # a partial load on request
    wrong = dict(state, fake_score=dict(state["fake_score"], **{"proj_in.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"fake_score: key 'proj_in.bias' has shape \(3,\)"):
        b.pipe.load_state_dict(wrong, strict=False)
    with pytest.raises(CheckpointError, match="unexpected sections"):
        b.pipe.load_state_dict(dict(state, teacher={}))


def test_modules_without_a_pipeline(tmp_path):
    torch.manual_seed(0)
    net, other = ToyDiT(dim=16), ToyDiT(dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4, 8, 8), torch.rand(2)).sample.square().mean().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "t", modules={"teacher": net}, optimizers={"teacher": opt}, step=3
    )
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    info = load_checkpoint(path, modules={"teacher": other}, optimizers={"teacher": other_opt})
    # parameters without a gradient (the unused context layer) have no state, as in the saved run
    assert len(other_opt.state) == len(opt.state) < len(list(net.parameters()))
    assert info.step == 3
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values())
    )
    assert torch.equal(
        other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    with pytest.raises(CheckpointError, match=r"holds the modules \['teacher'\], given \['net'\]"):
        load_checkpoint(path, modules={"net": other})
    with pytest.raises(
        CheckpointError, match="holds no DMD2 pipeline state but pipeline= is given"
    ):
        load_checkpoint(path, pipeline=build(0).pipe, modules={"teacher": other})
    with pytest.raises(TypeError, match=r"give a pipeline= .* or modules="):
        save_checkpoint(tmp_path / "x", step=0)
