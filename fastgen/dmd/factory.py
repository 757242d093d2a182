"""The fake score, made from the teacher."""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["create_fake_score", "is_sharded"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is FSDP-wrapped (FSDP1 wrappers or FSDP2 DTensor parameters)."""
    # FSDP1 wraps submodules; FSDP2 turns parameters into DTensors.
    if any(hasattr(m, "_fsdp_wrapped_module") for m in module.modules()):
        return True
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def create_fake_score(teacher: nn.Module, *, deep_copy: bool = True) -> nn.Module:
    """A trainable fake score initialised from the teacher's weights.

    Args:
        teacher: The teacher, weights loaded.
        deep_copy: Copy the teacher (the usual case). ``False`` reuses the module itself, for a
            caller that no longer needs it as the teacher.

    Returns:
        The fake score, in training mode, every parameter requiring grad.

    Raises:
        TypeError: ``teacher`` is not an ``nn.Module``.
        ValueError: ``deep_copy`` on an FSDP-wrapped teacher: DTensor parameters and FSDP's
            hooks do not survive ``copy.deepcopy``. Build the fake score like the teacher
            (meta-init, load the teacher's state dict, then shard it) instead.

    Example:
        >>> from torch import nn
        >>> teacher = nn.Linear(2, 2).requires_grad_(False)
        >>> fake = create_fake_score(teacher)
        >>> fake is teacher, all(p.requires_grad for p in fake.parameters())
        (False, True)
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if deep_copy and is_sharded(teacher):
        raise ValueError(
            "create_fake_score(teacher, deep_copy=True) cannot copy an FSDP-wrapped teacher "
            "(DTensor parameters and FSDP hooks do not survive copy.deepcopy): build the fake "
            "score as you built the teacher, load teacher.state_dict() into it, then shard it"
        )
    fake = copy.deepcopy(teacher) if deep_copy else teacher
    return fake.train().requires_grad_(True)
