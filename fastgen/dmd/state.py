"""Network state for checkpoints: read, check, and load a network's weights by parameter name.

The names are the network's own (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.`` and
activation checkpointing's wrappers are looked through); FSDP2-sharded parameters stay DTensors
(each rank holds its shard), which is what ``torch.distributed.checkpoint`` saves and reshards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fastgen.errors import CheckpointError

__all__ = ["check_state", "load_network_state", "network_state"]


def network_state(net: nn.Module) -> dict[str, Tensor]:
    """``net``'s parameters and persistent buffers by name (the tensors themselves)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net)


def check_state(
    what: str, expected: Mapping[str, Any], state: Mapping[str, Any], *, strict: bool = True
) -> None:
    """Raise :class:`~fastgen.errors.CheckpointError` unless ``state`` fits ``expected``.

    ``expected`` and ``state`` map names to tensors (or to anything with ``.shape``, such as
    ``torch.distributed.checkpoint``'s metadata). Shapes must always match; with ``strict``,
    the names too. The message names ``what`` (the network) and the first key at fault.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(
                f"missing keys {missing[:5]}"
                + (" ..." if len(missing) > 5 else "")
                + " (in the network, not in the saved state)"
            )
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:5]}"
                + (" ..." if len(unexpected) > 5 else "")
                + " (in the saved state, not in the network)"
            )
        raise CheckpointError(f"{what} does not match: {'; '.join(parts)}")
    for key in sorted(set(expected) & set(state)):
        want, got = _shape(expected[key]), _shape(state[key])
        if want != got:
            raise CheckpointError(
                f"{what}: key {key!r} has shape {got} in the checkpoint, {want} in the network"
            )


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        shape = getattr(value, "size", None)  # TensorStorageMetadata
    return None if shape is None or callable(shape) else tuple(shape)


def load_network_state(net: nn.Module, state: Mapping[str, Tensor], *, strict: bool = True) -> None:
    """Copy ``state`` into ``net``. Check it with :func:`check_state` first: a shape mismatch
    found here would leave the other keys already written."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(net, dict(state), options=StateDictOptions(strict=strict))
