r"""LoRA students and fake scores (``peft``): adapters on, merged for export, saved alone.

With ``lora: {rank, alpha, target_modules}`` in the run config, the student and the fake score
keep their base weights frozen and train low-rank adapters on the named layers,

.. math::

    W x \;\to\; W x + \tfrac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r \times d_{in}},\
    B \in \mathbb{R}^{d_{out} \times r},\ B = 0 \text{ at the start},

so both start as the teacher and only :math:`A, B` get gradients and optimizer state. The
export merges the adapters into the weights (a plain diffusers model) and also saves the
adapter alone in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``).

One base: the student and the fake score are :func:`shared_base` copies of the teacher, new
modules over the teacher's own weight tensors, so the run holds the base once (in the
teacher's dtype) and each network adds only its adapters (float32: what trains keeps float32
masters). The teacher itself carries no adapter, so its outputs are bitwise the plain
teacher's, and each loss's gradient reaches only the adapters of the network it trains. Under
FSDP2 the networks are sharded each on its own, and the student's and fake score's frozen
shards are the teacher's (:func:`fastgen.train.sharding.share_shards`): one base there too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.train.config import LoraConfig

__all__ = [
    "add_lora",
    "has_lora",
    "merged",
    "one_base",
    "save_adapter",
    "save_adapter_state",
    "shared_base",
]

ADAPTER = "default"


def _peft_config(config: LoraConfig):
    import peft

    return peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
    )


def add_lora(net: nn.Module, config: LoraConfig) -> nn.Module:
    """Put LoRA adapters on ``net``'s ``config.target_modules`` (in place); only they train.

    Returns:
        ``net``, its base weights frozen (``requires_grad=False``), the adapters trainable.

    Raises:
        ValueError: No module of ``net`` matches a target (the message names them).
    """
    import peft

    try:
        peft.inject_adapter_in_model(_peft_config(config), net, adapter_name=ADAPTER)
    except ValueError as err:
        raise ValueError(f"lora.target_modules {list(config.target_modules)}: {err}") from None
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()  # peft casts adapters to a bf16 base's dtype: keep fp32
    net._fastgen_lora = config  # what save_adapter writes as the adapter's config
    return net


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries LoRA adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


def _copy_sharing(net: nn.Module, shared) -> nn.Module:
    """``copy.deepcopy(net)`` except that the tensors in ``shared`` are the original ones."""
    memo = {id(t): t for t in shared}
    return copy.deepcopy(net, memo)


def one_base(run: Any) -> bool:
    """Whether the run's student and fake score are :func:`shared_base` copies of the teacher:
    with ``lora:`` and without FSDP2 (which shards each network on its own; a run built from
    a teacher folder then shares the base's shards instead)."""
    return run.lora is not None and run.parallel != "fsdp2"


def shared_base(net: nn.Module) -> nn.Module:
    """A copy of ``net`` over the same weights: new modules (and buffers), every parameter the
    original's own tensor. :func:`add_lora` on it gives a LoRA network that adds only its
    adapters to the memory, ``net`` left without any (never cast or move the copy on its own:
    that would change ``net``'s weights too)."""
    return _copy_sharing(net, net.parameters())


def merged(net: nn.Module) -> nn.Module:
    r"""A plain copy of ``net``: each peft layer replaced by its base layer with the adapter
    merged in, :math:`W + \tfrac{\alpha}{r} B A` (computed as peft's ``merge`` does, rounded
    once to :math:`W`'s dtype). The merged weights are new tensors; every other weight is
    ``net``'s own (frozen: the copy shares them instead of duplicating the base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = _copy_sharing(net, [p for p in net.parameters() if not p.requires_grad])
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            plain = copy.copy(base)  # new module; its own dicts, so net's base layer is kept
            plain._parameters = dict(base._parameters)
            plain._buffers, plain._modules = dict(base._buffers), dict(base._modules)
            with torch.no_grad():
                weight = base.weight
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter)
                plain.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, plain)
    out.__dict__.pop("_fastgen_lora", None)
    return out


def save_adapter(net: nn.Module, folder: str | Path) -> Path:
    """Save ``net``'s adapter alone, in peft's format: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (loadable with ``peft.set_peft_model_state_dict`` or
    diffusers' ``load_lora_adapter``)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=ADAPTER)
    return save_adapter_state(state, _peft_config(net._fastgen_lora), folder)


def save_adapter_state(state: dict, config: Any, folder: str | Path) -> Path:
    """Write an adapter's tensors (peft's saved names) and its ``peft.LoraConfig``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    return folder
