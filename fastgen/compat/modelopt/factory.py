"""``modelopt.torch.fastgen.factory``: ``create_fake_score`` with modelopt's exception type."""

from __future__ import annotations

from torch import nn

from fastgen.dmd.factory import create_fake_score as _create_fake_score

__all__ = ["create_fake_score"]


def create_fake_score(teacher: nn.Module, *, deep_copy: bool = True) -> nn.Module:
    """:func:`fastgen.create_fake_score`; a teacher whose parameters look sharded (any parameter
    with ``full_tensor``, modelopt's test) raises ``RuntimeError`` under ``deep_copy``.

    Raises:
        RuntimeError: ``deep_copy`` of an FSDP-wrapped teacher: meta-init the fake score like
            the teacher, load the teacher's state dict, then shard it.
    """
    if deep_copy and any(hasattr(p, "full_tensor") for p in teacher.parameters()):
        raise RuntimeError(
            "create_fake_score(deep_copy=True) cannot copy an FSDP-wrapped teacher: meta-init "
            "the fake score like the teacher, load teacher.state_dict() into it, then shard it"
        )
    return _create_fake_score(teacher, deep_copy=deep_copy)
