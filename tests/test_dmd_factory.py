"""create_fake_score and is_sharded: copies, trainability, and the FSDP2 refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen import create_fake_score
from fastgen.dmd.factory import is_sharded


def test_fake_score_is_an_independent_trainable_copy():
    teacher = nn.Linear(3, 3).requires_grad_(False).eval()
    fake = create_fake_score(teacher)
    assert fake is not teacher and fake.training
    assert all(p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(fake.weight, teacher.weight)
    with torch.no_grad():
        fake.weight.add_(1.0)  # its own storage, not the teacher's
    assert not torch.equal(fake.weight, teacher.weight)


def test_without_a_copy_the_teacher_itself_becomes_the_fake_score():
    teacher = nn.Linear(3, 3).requires_grad_(False).eval()
    fake = create_fake_score(teacher, deep_copy=False)
    assert fake is teacher and fake.training and fake.weight.requires_grad


def test_bad_teacher_is_named():
    with pytest.raises(TypeError, match=r"^teacher must be an nn.Module, got dict$"):
        create_fake_score({})


def test_an_fsdp2_teacher_is_refused_with_what_to_do(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    teacher = nn.Sequential(nn.Linear(3, 3))
    assert not is_sharded(teacher)
    fully_shard(teacher, mesh=init_device_mesh("cpu", (1,)))
    assert is_sharded(teacher)
    with pytest.raises(
        ValueError,
        match=r"^create_fake_score\(teacher, deep_copy=True\) cannot copy an FSDP-wrapped teacher "
        r"\(DTensor parameters and FSDP hooks do not survive copy.deepcopy\): build the fake "
        r"score as you built the teacher, load teacher.state_dict\(\) into it, then shard it$",
    ):
        create_fake_score(teacher)
    assert create_fake_score(teacher, deep_copy=False) is teacher
