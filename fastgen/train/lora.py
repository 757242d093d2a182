r"""LoRA students and fake scores (``peft``): adapters on, merged for export, saved alone.

With ``lora: {rank, alpha, target_modules}`` in the run config, the student and the fake score
keep their base weights frozen and train low-rank adapters on the named layers,

.. math::

    W x \;\to\; W x + \tfrac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r \times d_{in}},\
    B \in \mathbb{R}^{d_{out} \times r},\ B = 0 \text{ at the start},

so both start as the teacher and only :math:`A, B` get gradients and optimizer state. The
export merges the adapters into the weights (a plain diffusers model) and also saves the
adapter alone in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from fastgen.train.config import LoraConfig

__all__ = ["add_lora", "has_lora", "merged", "save_adapter"]

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
    net._fastgen_lora = config  # what save_adapter writes as the adapter's config
    return net


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries LoRA adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


def merged(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every adapter merged into its layer's weight and the peft layers
    replaced by the plain ones: the model as it was, with the trained weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(net)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, module.get_base_layer())
    out.__dict__.pop("_fastgen_lora", None)
    return out


def save_adapter(net: nn.Module, folder: str | Path) -> Path:
    """Save ``net``'s adapter alone, in peft's format: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (loadable with ``peft.set_peft_model_state_dict`` or
    diffusers' ``load_lora_adapter``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _peft_config(net._fastgen_lora).save_pretrained(str(folder))
    state = get_peft_model_state_dict(net, adapter_name=ADAPTER)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    return folder
