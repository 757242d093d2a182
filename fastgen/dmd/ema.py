r"""Exponential moving average of a network's weights, fused, FSDP2-aware.

.. math::

    \theta_{\text{ema}} \leftarrow \beta_i\, \theta_{\text{ema}} + (1 - \beta_i)\, \theta

with :math:`\beta_i` the config's schedule at iteration :math:`i`. One ``torch._foreach_lerp_``
updates every parameter shadow at once. Shadows are kept in ``EMAConfig.dtype`` (float32 by
default, also for a bf16 model: a bf16 shadow would round each small increment away), beside
the weights or, with ``EMAConfig.cpu_offload``, in host memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastgen.dmd.config import EMAConfig

__all__ = ["ExponentialMovingAverage", "ema_decay"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Wrappers that only rename parameters: torch.compile's module, activation checkpointing.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")


def ema_decay(cfg: EMAConfig, iteration: int) -> float:
    r"""The decay :math:`\beta` of update number ``iteration`` under ``cfg``'s schedule.

    .. math::

        \beta = \begin{cases}
        \text{decay} & \text{constant} \\
        (1 - 1/i)^{\gamma + 1} & \text{power} \\
        0.5^{\,b / h}, \quad h = \min(1000\,\text{halflife\_kimg},\ r\, i\, b) & \text{halflife}
        \end{cases}

    with ``b = batch_size`` and ``r = rampup_ratio`` (no minimum when it is ``None``).

    Example:
        >>> ema_decay(EMAConfig(type="power", gamma=1.0), 2)
        0.25
    """
    if cfg.type == "constant":
        return cfg.decay
    if cfg.type == "power":
        return (1.0 - 1.0 / max(iteration, 1)) ** (cfg.gamma + 1.0)
    halflife_nimg = cfg.halflife_kimg * 1000.0
    if cfg.rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, iteration * cfg.batch_size * cfg.rampup_ratio)
    return 0.5 ** (cfg.batch_size / max(halflife_nimg, 1e-8))


def _is_lora_network(named: list[tuple[str, Tensor]]) -> bool:
    """Whether a network's ``named_parameters()`` hold peft LoRA adapters (``lora_``): what the
    EMA and the checkpoints keep of it is the adapters."""
    return any("lora_" in name for name, _ in named)


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "to_local")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # DDP keeps the network in .module; its parameters are the network's own.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ExponentialMovingAverage:
    """Shadow copies of a network's parameters (and buffers), updated by a decay schedule.

    Under FSDP2 (DTensor parameters, ``cfg.fsdp2``), ``cfg.mode="full_tensor"`` all-gathers
    every parameter in each update (a collective: call ``update`` on every rank), so each rank
    holds the whole averaged network; ``"local_shard"`` averages each rank's shard only, with
    no communication. Buffers are copied, not averaged. Parameters frozen at construction
    (``requires_grad=False``: a LoRA network's base) have no shadow: their average is
    themselves, and :meth:`copy_to` and :meth:`swap` leave them as they are; nor have a LoRA
    network's buffers (peft ``lora_`` parameters: the buffers are the frozen base's).

    Args:
        model: The network to track (DDP and ``torch.compile`` wrappers are looked through).
        config: The schedule and the shadows' dtype.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> ema = ExponentialMovingAverage(net, EMAConfig(decay=0.5))
        >>> ema.update(net, iteration=1)  # the first update copies the weights
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(2.0)
        >>> ema.update(net, iteration=2)
        >>> torch.allclose(ema.state_dict()["weight"], net.weight - 1.0)
        True
    """

    def __init__(self, model: nn.Module, config: EMAConfig) -> None:
        if not isinstance(config, EMAConfig):
            raise TypeError(f"config must be an EMAConfig, got {type(config).__name__}")
        self.config = cfg = config
        model = _unwrap(model)
        self._shadow: dict[str, Tensor] = {}
        self._buffers: dict[str, Tensor] = {}
        # local_shard shadows: the parameter's mesh, placements, global shape and stride, so a
        # checkpoint can save each rank's shard as a DTensor (a plain tensor would be deduplicated).
        self._layouts: dict[str, tuple] = {}
        self._frozen: set[str] = set()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    self._frozen.add(_clean(name))
                    continue
                live = self._live(p)
                dtype = _DTYPES[cfg.dtype] if cfg.dtype is not None else live.dtype
                shadow = live.to(dtype=dtype, copy=True)
                if cfg.cpu_offload and shadow.device.type != "cpu":
                    shadow = shadow.cpu().pin_memory()  # pinned: the copies over are async
                self._shadow[_clean(name)] = shadow
                if cfg.fsdp2 and cfg.mode == "local_shard" and _is_dtensor(p):
                    self._layouts[_clean(name)] = (p.device_mesh, p.placements, p.shape, p.stride())
            lora = _is_lora_network(list(model.named_parameters()))
            for name, b in () if lora else model.named_buffers():
                self._buffers[_clean(name)] = b.detach().clone()
        self._initialized = False

    def _live(self, p: Tensor) -> Tensor:
        p = p.detach()
        if self.config.fsdp2 and _is_dtensor(p):
            return p.full_tensor() if self.config.mode == "full_tensor" else p.to_local()
        return p

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        shadows, lives = [], []
        for name, p in _unwrap(model).named_parameters():
            key = _clean(name)
            if key in self._frozen:
                continue
            if key not in self._shadow:
                raise KeyError(f"parameter {key!r} is not tracked by this EMA (another model?)")
            shadows.append(self._shadow[key])
            lives.append(self._live(p))
        return shadows, lives

    @torch.no_grad()
    def update(self, model: nn.Module, *, iteration: int) -> None:
        """Fold the live weights of ``model`` into the shadows.

        Updates before ``cfg.start_iter`` are ignored; at ``start_iter``, and on the first
        update after construction, the shadows are set to the live weights (after
        :meth:`load_state_dict`, the restored shadows are averaged into instead).

        Args:
            model: The tracked network (same parameter names as at construction).
            iteration: The update's number, >= 0; it sets the decay of the schedule.
        """
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
        if iteration < self.config.start_iter:
            return
        shadows, lives = self._pairs(model)
        first = iteration == self.config.start_iter or not self._initialized
        weight = 1.0 - ema_decay(self.config, iteration)
        if self.config.cpu_offload:  # one parameter's host copy at a time, not the network's
            for shadow, live in zip(shadows, lives, strict=True):
                live = live.to(device=shadow.device, dtype=shadow.dtype)
                if first:
                    shadow.copy_(live)
                else:
                    shadow.lerp_(live, weight)
        else:
            lives = [live.to(device=shadow.device, dtype=shadow.dtype)
                     for shadow, live in zip(shadows, lives, strict=True)]  # fmt: skip
            if first:
                torch._foreach_copy_(shadows, lives)
            else:
                torch._foreach_lerp_(shadows, lives, weight)
        self._initialized = True
        for name, b in _unwrap(model).named_buffers():
            key = _clean(name)
            if key in self._buffers:
                self._buffers[key].copy_(b.detach())

    @torch.no_grad()
    def copy_to(self, target: nn.Module) -> None:
        """Write the shadows into ``target``'s parameters and buffers (cast to their dtype).

        ``target`` may be plain or FSDP2-sharded: a sharded parameter receives its own shard of
        a ``full_tensor`` shadow (no communication), or the ``local_shard`` shadow itself.
        """
        for name, p in _unwrap(target).named_parameters():
            key = _clean(name)
            if key in self._frozen:
                continue
            if key not in self._shadow:
                raise KeyError(f"target parameter {key!r} has no EMA shadow")
            shadow = self._shadow[key]
            if _is_dtensor(p):
                local = p.to_local()
                if shadow.shape != local.shape:  # a full shadow: take this rank's shard
                    from torch.distributed.tensor import distribute_tensor

                    shadow = distribute_tensor(
                        shadow.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                    ).to_local()
                local.copy_(shadow)
            else:
                p.copy_(shadow)
        for name, b in _unwrap(target).named_buffers():
            key = _clean(name)
            if key in self._buffers:
                b.copy_(self._buffers[key])

    @torch.no_grad()
    def swap(self, target: nn.Module) -> bool:
        """Exchange the shadows with ``target``'s weights in place, one tensor at a time, so the
        network samples with the EMA weights without a second copy of it; a second call swaps
        back, bitwise.

        Returns:
            ``False`` (and nothing is touched) unless every shadow has its weight's (local)
            shape and dtype: a ``full_tensor`` shadow of a sharded parameter, or a float32
            shadow of a bf16 weight, cannot be swapped exactly (use :meth:`copy_to` on a
            backup instead).
        """
        pairs = []
        for name, p in _unwrap(target).named_parameters():
            if _clean(name) in self._frozen:
                continue
            shadow = self._shadow.get(_clean(name))
            local = p.to_local() if _is_dtensor(p) else p
            if shadow is None or shadow.shape != local.shape or shadow.dtype != local.dtype:
                return False
            pairs.append((shadow, local))
        for name, b in _unwrap(target).named_buffers():
            shadow = self._buffers.get(_clean(name))
            if shadow is not None:
                if shadow.shape != b.shape or shadow.dtype != b.dtype:
                    return False
                pairs.append((shadow, b))
        for shadow, live in pairs:
            held = live.clone()
            live.copy_(shadow)
            shadow.copy_(held)
        return True

    @property
    def initialized(self) -> bool:
        """Whether the shadows hold averaged weights (set by the first update or a load)."""
        return self._initialized

    def state_dict(self) -> dict[str, Tensor]:
        """The shadows by parameter (and buffer) name: the tensors themselves, not copies."""
        return {**self._shadow, **self._buffers}

    def sharded_state_dict(self) -> dict[str, Tensor]:
        """:meth:`state_dict` for ``torch.distributed.checkpoint``: ``local_shard`` shadows of
        FSDP2 parameters as DTensors over their own storage (each rank's shard, the parameter's
        layout), every other shadow as itself. Loading into it writes into the shadows."""
        if not self._layouts:
            return self.state_dict()
        from torch.distributed.tensor import DTensor

        state = self.state_dict()
        for key, (mesh, placements, shape, stride) in self._layouts.items():
            state[key] = DTensor.from_local(
                state[key], mesh, placements, run_check=False, shape=shape, stride=stride
            )
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], *, initialized: bool = True) -> None:
        """Restore shadows saved by :meth:`state_dict` (or :meth:`sharded_state_dict`); names
        and shapes must match exactly, and nothing is written unless they all do.

        Args:
            state: The shadows by name.
            initialized: Whether the restored shadows hold averaged weights (the next update
                averages into them); ``False`` makes the next update copy the live weights.
        """
        expected = set(self._shadow) | set(self._buffers)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"EMA state mismatch: missing {missing}, unexpected {unexpected}")
        targets = self.sharded_state_dict()
        for key, value in state.items():
            if tuple(value.shape) != tuple(targets[key].shape):
                raise KeyError(
                    f"EMA state mismatch: {key!r} has shape {tuple(value.shape)}, the shadow "
                    f"{tuple(targets[key].shape)}"
                )
        for key, value in state.items():
            if value is targets[key] or value is self._shadow.get(key):
                continue  # loaded in place already (torch.distributed.checkpoint)
            target = self._shadow.get(key, self._buffers.get(key))
            if _is_dtensor(value):
                value = value.to_local()
            target.copy_(value)
        self._initialized = initialized
