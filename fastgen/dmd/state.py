"""Network state for checkpoints: read, check, and load a network's weights by parameter name.

The names are the network's own (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.`` and
activation checkpointing's wrappers are looked through); FSDP2-sharded parameters stay DTensors
(each rank holds its shard), which is what ``torch.distributed.checkpoint`` saves and reshards.
A LoRA network's state is what trains: its frozen base is the teacher's weights, not saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fastgen.dmd.ema import ExponentialMovingAverage, _is_lora_network
from fastgen.errors import CheckpointError

__all__ = [
    "check_state",
    "load_network_state",
    "load_pipeline_state",
    "network_state",
    "pipeline_state",
]


def _inner(net: nn.Module) -> nn.Module:
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def _trained_only(net: nn.Module) -> set[str] | None:
    """The names of a LoRA network's trained parameters (``None`` for any other network)."""
    named = list(_inner(net).named_parameters())
    if not _is_lora_network(named):
        return None
    return {name.replace("._checkpoint_wrapped_module", "") for name, p in named
            if p.requires_grad}  # fmt: skip


def network_state(net: nn.Module) -> dict[str, Tensor]:
    """``net``'s parameters and persistent buffers by name (the tensors themselves); for a
    LoRA network (peft ``lora_`` parameters), only the parameters that train."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(net)
    trained = _trained_only(net)
    return state if trained is None else {k: v for k, v in state.items() if k in trained}


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

    if _trained_only(net) is not None:  # the frozen base is not in the state
        check_state("network", network_state(net), state, strict=strict)
        strict = False
    set_model_state_dict(net, dict(state), options=StateDictOptions(strict=strict))


def pipeline_state(
    nets: Mapping[str, nn.Module], ema: ExponentialMovingAverage | None, iteration: int
) -> dict[str, Any]:
    """A pipeline's trained state as one nested dict: each network's :func:`network_state`,
    the EMA shadows (``"ema"``, ``"ema_initialized"``) when there is an EMA, and the EMA update
    counter (``"iteration"``). The tensors are the live ones: DCP loads into them in place."""
    state: dict[str, Any] = {name: network_state(net) for name, net in nets.items()}
    if ema is not None:
        state["ema"] = ema.sharded_state_dict()
        state["ema_initialized"] = ema.initialized
    state["iteration"] = iteration
    return state


def load_pipeline_state(
    nets: Mapping[str, nn.Module],
    ema: ExponentialMovingAverage | None,
    state: dict[str, Any],
    *,
    strict: bool = True,
    optional: Mapping[str, bool] | None = None,
) -> int:
    """Write :func:`pipeline_state`'s output back, everything checked before anything is
    written; returns the saved EMA update counter.

    ``optional`` maps a section that a pipeline may or may not have (``"discriminator"``) to
    whether this one has it; the EMA is checked the same way.

    Raises:
        CheckpointError: A network's keys or shapes do not match (named), or the state holds
            a section this pipeline lacks, or lacks one it has.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    sections = {**(optional or {}), "ema": ema is not None}
    for name, has in sections.items():
        if name in state and not has:
            hint = "config.ema" if name == "ema" else f"{name}="
            raise CheckpointError(
                f"the state holds a {name} but this pipeline has none ({hint} not set)"
            )
        if name not in state and has:
            raise CheckpointError(f"this pipeline has a {name} but the state holds none")
    known = {*nets, "iteration", *(("ema", "ema_initialized") if ema is not None else ())}
    unknown = sorted(set(state) - known)
    if unknown:
        raise CheckpointError(f"unexpected sections {unknown} in the pipeline state")
    for name in nets:
        if name not in state:
            raise CheckpointError(f"the state holds no {name}")
    for name, net in nets.items():
        check_state(name, network_state(net), state[name], strict=strict)
    if ema is not None:
        check_state("ema", ema.sharded_state_dict(), state["ema"], strict=True)
    for name, net in nets.items():
        load_network_state(net, state[name], strict=strict)
    if ema is not None:
        ema.load_state_dict(state["ema"], initialized=bool(state.get("ema_initialized", True)))
    return int(state.get("iteration", 0))
