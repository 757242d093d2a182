"""fastgen.train.config: deprecated spellings still read, with a warning; cross-field checks."""

from __future__ import annotations

import pytest

from fastgen.train import OptimConfig, RunConfig


def test_shared_schedule_is_deprecated_and_reaches_every_network():
    with pytest.warns(DeprecationWarning, match=r"optim.schedule and optim.min_lr_ratio"):
        optim = OptimConfig.model_validate(
            {"schedule": "cosine", "min_lr_ratio": 0.1, "student": {"lr": 1e-3}}
        )
    for net in (optim.student, optim.fake_score, optim.discriminator):
        assert (net.schedule, net.min_lr_ratio) == ("cosine", 0.1)
    assert optim.student.lr == 1e-3


def test_a_networks_own_schedule_wins_over_the_shared_one():
    with pytest.warns(DeprecationWarning):
        run = RunConfig.model_validate(
            {
                "out": "x",
                "steps": 1,
                "optim": {"schedule": "cosine", "fake_score": {"schedule": "constant"}},
            }
        )
    assert run.optim.student.schedule == "cosine"
    assert run.optim.fake_score.schedule == "constant"


def test_per_network_schedules_do_not_warn(recwarn):
    OptimConfig.model_validate({"student": {"schedule": "cosine"}})
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_other_unknown_keys_still_fail():
    with pytest.raises(ValueError, match="sched"):
        OptimConfig.model_validate({"sched": "cosine"})


def test_cpu_offload_is_fsdp2s_and_named_otherwise():
    assert RunConfig(out="r", steps=1, parallel="fsdp2", cpu_offload=True).cpu_offload
    for parallel in ("none", "ddp"):
        with pytest.raises(ValueError, match=f"cpu_offload needs parallel: fsdp2.*{parallel}"):
            RunConfig(out="r", steps=1, parallel=parallel, cpu_offload=True)
