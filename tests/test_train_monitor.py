"""fastgen.train.monitor: the guided teacher call, the evaluation's figures against float64
recomputations, the alarm on a collapsed student, best steps, the RNG left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from toys import ToyDiT, toy_batch

from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.guidance import classifier_free_guidance
from fastgen.eval import diversity_ratio, frechet_distance, mean_pairwise_distance
from fastgen.train.config import EvalConfig, RunConfig
from fastgen.train.monitor import GuidedCall, Monitor, student_ladders

DMD = DMDConfig(guidance_scale=3.0, student_sample_steps=2, student_sample_type="ode",
                sample_t_cfg={"t_list": [0.999, 0.5, 0.0]})  # fmt: skip


class Collapsed(nn.Module):
    """A student that predicts the flow to one picture (trainable) whatever its input."""

    def __init__(self, picture: torch.Tensor, timestep_scale: float = 1.0) -> None:
        super().__init__()
        self.picture = nn.Parameter(picture)
        self.scale = timestep_scale

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=True):
        t = (timestep / self.scale).view(-1, 1, 1, 1)
        # x_t = x0 + t v  =>  v = (x_t - x0) / t
        return ((hidden_states - self.picture) / t.clamp_min(1e-3),)


def _batch():
    torch.manual_seed(0)
    latents, _, cond, neg = toy_batch(4)
    return {"latents": latents, "encoder_hidden_states": cond,
            "negative_encoder_hidden_states": neg[:1]}  # fmt: skip


def test_guided_call_is_cfg_of_the_two_calls():
    torch.manual_seed(0)
    net, call = ToyDiT(), NetworkCall(num_train_timesteps=1000)
    b = _batch()
    x, t = b["latents"], torch.full((4,), 0.5)
    guided = GuidedCall(call, 3.0, b["negative_encoder_hidden_states"])
    cond = call(net, "teacher", x, t, b["encoder_hidden_states"], {})
    uncond = call(net, "teacher", x, t, b["negative_encoder_hidden_states"].expand(4, -1, -1), {})
    with torch.no_grad():
        got = guided(net, "teacher", x, t, b["encoder_hidden_states"], {})
    assert torch.equal(got, classifier_free_guidance(cond, uncond, 3.0).detach())
    assert torch.equal(GuidedCall(call, None)(net, "t", x, t, b["encoder_hidden_states"], {}), cond)


def test_student_ladders_are_one_step_and_k_steps():
    assert student_ladders(DMD) == {1: [0.999, 0.0], 2: [0.999, 0.5, 0.0]}


def test_figures_against_recomputation_and_the_rng_left_alone():
    torch.manual_seed(1)
    teacher = ToyDiT()
    student = copy.deepcopy(teacher)
    monitor = Monitor(EvalConfig(every=1, samples=2, seeds=3), DMD, _batch())
    state = torch.get_rng_state()
    report = monitor.evaluate(5, student, teacher)
    assert torch.equal(torch.get_rng_state(), state)  # evaluations draw from their own generator
    t, s = report["teacher"], report["student"][2]
    assert s["x"].shape == (6, 4, 8, 8) and set(report["student"]) == {1, 2}
    fs, ft = s["features"].reshape(2, 3, -1), t["features"].reshape(2, 3, -1)
    figures = report["figures"]
    assert figures["diversity"] == float(mean_pairwise_distance(fs))
    assert figures["diversity_ratio"] == float(diversity_ratio(fs, ft))
    assert figures["fd_to_teacher"] == float(frechet_distance(s["features"], t["features"]))
    assert "psnr_to_teacher" not in figures  # latents, no pictures: no PSNR
    assert monitor.history == [{"step": 5, **figures}]
    # the teacher's samples are computed once
    assert monitor.teacher_samples(teacher) is t


def test_alarm_fires_on_a_collapsed_student_and_not_on_the_teacher_itself():
    torch.manual_seed(2)
    teacher = ToyDiT()
    config = EvalConfig(every=1, samples=2, seeds=4, collapse={"threshold": 0.5, "patience": 2})
    healthy, collapsed = Monitor(config, DMD, _batch()), Monitor(config, DMD, _batch())
    student = Collapsed(torch.randn(1, 4, 8, 8))
    for step in (1, 2):
        ok = healthy.evaluate(step, teacher, teacher)  # the teacher as its own student
        bad = collapsed.evaluate(step, student, teacher)
    assert bad["figures"]["diversity_ratio"] < 1e-3 and bad["alarm"]["collapsed"]
    assert not ok["alarm"]["collapsed"] and ok["figures"]["diversity_ratio"] > 0.5
    assert collapsed.last_healthy_step() is None and healthy.last_healthy_step() == 2


def test_best_steps_and_state_round_trip():
    monitor = Monitor(EvalConfig(every=1, samples=2, seeds=2), DMD, _batch())
    monitor.history = [
        {"step": 10, "diversity_ratio": 0.9, "fd_to_teacher": 3.0},
        {"step": 20, "diversity_ratio": 0.95, "fd_to_teacher": 1.0},
        {"step": 30, "diversity_ratio": 0.9, "fd_to_teacher": 2.0},
    ]
    assert monitor.best("diversity_ratio", 1) == [20]
    assert monitor.best("diversity_ratio", 2) == [10, 20]  # ties: the earlier
    assert monitor.best("fd_to_teacher", 2) == [20, 30]  # lower is better
    other = Monitor(EvalConfig(every=1, samples=2, seeds=2), DMD, _batch())
    other.load_state_dict(monitor.state_dict())
    assert other.history == monitor.history and other.last_healthy_step() == 30


def test_checkpoint_best_needs_aligned_evaluations():
    with pytest.raises(ValueError, match=r"multiple of checkpoint\.every"):
        RunConfig(out="x", steps=4, checkpoint={"every": 2, "best": "diversity_ratio"},
                  eval={"every": 3})  # fmt: skip
    run = RunConfig(out="x", steps=4, checkpoint={"every": 2, "best": "fd_to_teacher"},
                    eval={"every": 4})  # fmt: skip
    assert run.checkpoint.best == "fd_to_teacher"


# --- in the trainer ---------------------------------------------------------------------------


def _eval_run(out, **eval_fields):
    from test_train import run_config

    checkpoint = {"every": 2, "keep": 1, "best": "diversity_ratio"}
    return run_config(out, steps=6, checkpoint=checkpoint,
                      eval={"every": 2, "samples": 2, "seeds": 2, "teacher_steps": 2,
                            **eval_fields})  # fmt: skip


def test_evaluations_are_logged_kept_best_and_resumed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import Data, state_of, trainer
    from train_toys import Interrupted

    straight = trainer(_eval_run(tmp_path / "a"), Data())
    straight.fit()
    history = straight._monitor.history
    assert [h["step"] for h in history] == [2, 4, 6]
    events = EventAccumulator(str(tmp_path / "a" / "tensorboard")).Reload()
    for tag in ("eval/diversity_ratio", "eval/fd_to_teacher", "eval/vendi", "eval/recall"):
        assert [e.step for e in events.Scalars(tag)] == [2, 4, 6], tag
    assert [e.value for e in events.Scalars("eval/diversity_ratio")] == pytest.approx(
        [h["diversity_ratio"] for h in history]
    )
    # keep: 1 newest, plus the best by diversity_ratio
    best = straight._monitor.best("diversity_ratio", 1)
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == sorted({"step_00000006", *(f"step_{s:08d}" for s in best)})
    # a run killed in iteration 5 (after the step-4 checkpoint) and resumed: the same history
    # and the same final state (1 batch for the evaluation set, then 3 per iteration)
    first = trainer(_eval_run(tmp_path / "b"), Data(stop_at=1 + 4 * 3 + 2))
    with pytest.raises(Interrupted):
        first.fit()
    resumed = trainer(_eval_run(tmp_path / "b"), Data())
    resumed.fit()
    assert resumed._monitor.history == history
    assert all(torch.equal(v, state_of(straight)[k]) for k, v in state_of(resumed).items())


def test_the_alarm_warns_or_stops_without_saving_the_collapsed_state(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import Data, trainer

    from fastgen.train import Trainer
    from fastgen.train.trainer import CollapseError

    def collapsed(run):  # the teacher's, but a student that gives one picture whatever the noise
        torch.manual_seed(0)
        return Trainer(run, data=Data(), teacher=ToyDiT(dim=16, depth=2),
                       student=Collapsed(torch.randn(1, 4, 8, 8), timestep_scale=1000.0))  # fmt: skip

    low = {"collapse": {"threshold": 0.5, "patience": 2}}
    warned = collapsed(_eval_run(tmp_path / "warn", **low))
    warned.fit()
    out = capsys.readouterr().out
    assert "collapse alarm at iteration 2" not in out  # patience 2: the second low one fires
    assert "collapse alarm at iteration 4: the student's diversity is" in out
    events = EventAccumulator(str(tmp_path / "warn" / "tensorboard")).Reload()
    assert "eval/alarm/text_summary" in events.Tags()["tensors"]
    stopped = collapsed(_eval_run(tmp_path / "stop", stop_on_collapse=True, **low))
    with pytest.raises(CollapseError, match=r"below 0\.5 for 2 evaluations.*is none"):
        stopped.fit()
    assert (tmp_path / "stop" / "checkpoints" / "step_00000002").is_dir()
    assert not (tmp_path / "stop" / "checkpoints" / "step_00000004").exists()  # not saved
    # the teacher's own copy as the student does not fire
    healthy = trainer(_eval_run(tmp_path / "ok", stop_on_collapse=True, **low), Data())
    healthy.fit()
    assert not any(h["diversity_ratio"] < 0.5 for h in healthy._monitor.history)


def test_decoded_validation_grid_with_the_teacher_row(tmp_path):
    """A teacher from a pipeline folder: the grid's rows are the teacher's and the student's
    pictures, decoded as the pipeline decodes, for prompts given as text."""
    from families import save_sd3_pipeline
    from PIL import Image
    from test_train_decode import _pipeline_decode

    import fastgen
    from fastgen.train import build
    from fastgen.train.evaluate import load_pipeline
    from fastgen.train.images import image_grid

    folder = save_sd3_pipeline(tmp_path)
    run = RunConfig.model_validate({
        "out": str(tmp_path / "run"), "steps": 2, "recipe": "dmd2_sd3",
        "teacher": {"path": str(folder), "subfolder": "transformer"},
        "dmd": {"gan_loss_weight_gen": 0.0, "student_update_freq": 1},
        "data": "train_toys:sd3_data", "checkpoint": {"every": 2},
        "log": {"progress": False},
        "validation": {"every": 2, "prompts": ["a cat", "a dog"], "teacher_steps": 2},
    })  # fmt: skip
    t = build(run)
    t.fit()
    grids = torch.load(tmp_path / "run" / "samples" / "step_00000002.pt")
    assert list(grids) == ["teacher", "1_step"]
    png = Image.open(tmp_path / "run" / "samples" / "step_00000002.png")
    assert png.mode == "RGB" and png.size == (2 * 16, 2 * 16)  # 2 prompts; teacher, 1 step
    viewer, pipe = t._viewer, load_pipeline(folder)
    with torch.no_grad():
        x = fastgen.sample(t.ema_student(), viewer.noise, [t.dmd.sample_t_cfg.max_t, 0.0],
                           mode=t.dmd.student_sample_type, pred_type=t.dmd.pred_type,
                           num_train_timesteps=t.dmd.num_train_timesteps,
                           encoder_hidden_states=viewer.ehs, **viewer.kwargs)  # fmt: skip
        expected = _pipeline_decode(pipe, x, 16, 16)
    assert torch.equal(grids["1_step"], image_grid(expected.float() * 2 - 1))
