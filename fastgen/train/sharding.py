"""FSDP2 networks without a full copy on any rank: built on the meta device, sharded per block,
filled shard by shard from the model folder's safetensors, gathered a tensor at a time.

Under ``parallel: fsdp2`` a teacher folder becomes the teacher, the student and the fake score
like this:

1. :func:`empty_network`: the diffusers class built from ``config.json`` with its parameters on
   the meta device (no memory) and its buffers real (positional tables computed as usual);
2. :func:`shard_network`: ``fully_shard`` per transformer block, then the whole network;
3. :func:`load_shards`: each parameter's local rows read from the safetensors file by slice
   (``safe_open(...).get_slice``), so a rank reads only its own rows and never holds more than
   its shards: the student and fake score are float32 copies of the teacher's rows (rounded to
   the teacher's dtype first, as ``teacher.to(float32)`` would be); with LoRA their frozen
   base is the teacher's own shards (:func:`share_shards`: one base in memory, as without
   FSDP2) and only the adapters, float32, are theirs.

:func:`gathered_state_dict` goes the other way for the export: one parameter at a time is
all-gathered and kept (on CPU) by rank 0 only; :func:`merged_gathered` merges LoRA layers on
the way and :func:`write_safetensors` writes each tensor as it comes, so rank 0 never holds
the whole network.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "blocks",
    "BLOCK_VARIANTS",
    "checkpoint_blocks",
    "compiled_block",
    "empty_network",
    "gathered_state_dict",
    "init_lora_shards",
    "is_offloaded",
    "is_sharded",
    "load_shards",
    "lora_layers",
    "merged_gathered",
    "mixed_precision",
    "process_group_backend",
    "safetensors_files",
    "shard_network",
    "share_shards",
    "write_safetensors",
]


def blocks(net: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ``ModuleList``s (transformer blocks): FSDP2's units."""
    found, lists = [], []
    for name, module in net.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in lists):
            lists.append(name)
            found.extend(module)
    return found


def _checkpointed(cls: type) -> type:
    from torch.utils.checkpoint import checkpoint

    base_forward = cls.forward  # the function itself: dynamo traces it, not a class attribute

    def forward(self, *args, **kwargs):
        # non-reentrant: under FSDP2 the block's own hooks have gathered its weights for the
        # forward, and gather them again before its backward, where the recompute runs
        return checkpoint(base_forward, self, *args, use_reentrant=False, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_checkpointed": True})


def checkpoint_blocks(net: nn.Module) -> nn.Module:
    """Activation checkpointing per block (see :func:`blocks`), in place: a block keeps only
    its inputs for the backward and runs its forward again there. Names, weights and outputs
    are unchanged (state dicts load across), and it composes with FSDP2 and ``torch.compile``."""
    for block in blocks(net):
        if not getattr(block, "_checkpointed", False):
            block.__class__ = _checkpointed(type(block))
    return net


def compiled_block(forward: Callable) -> Callable:
    """``forward`` compiled whole (``fullgraph=True``), for a transformer block under FSDP2.

    Every block of a class shares one code object, so its graphs are kept per variant: the
    block's kind (a last block without context outputs), train or eval, frozen or trainable
    weights, grad mode, for the teacher, the student and the fake score. That is up to 16 for
    SD3's joint blocks, over dynamo's default limit of 8; the limit is raised to
    :data:`BLOCK_VARIANTS` for these calls only. Inside a ``torch.func`` transform (the
    consistency family's forward-mode JVP of the student) the block runs eagerly: dynamo does
    not trace a compiled region called from within one.

    Args:
        forward: The block's bound ``forward`` (FSDP2's hooks run around it, in eager).

    Returns:
        The function to set as the block's ``forward``.
    """
    graph = torch.compile(forward, fullgraph=True)

    @functools.wraps(forward)
    def call(*args, **kwargs):
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return forward(*args, **kwargs)
        with torch._dynamo.config.patch(recompile_limit=BLOCK_VARIANTS):
            return graph(*args, **kwargs)

    return call


#: graphs one block class may compile to under FSDP2 (see :func:`compiled_block`)
BLOCK_VARIANTS = 32


def is_sharded(net: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``net``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def mixed_precision(precision: str):
    """FSDP2's ``MixedPrecisionPolicy`` for the run's ``precision``: ``bf16`` gathers bfloat16
    parameters and reduces gradients in float32; ``fp32`` changes nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_network(net: nn.Module, mp_policy=None, *, offload: bool = False) -> nn.Module:
    """``fully_shard`` each block of ``net`` (see :func:`blocks`), then ``net`` itself (in place).

    Args:
        net: A plain network, on the meta device or materialized.
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` (default: none).
        offload: FSDP2's ``CPUOffloadPolicy``: the shards (and so the gradients and optimizer
            states) in host memory, pinned on CUDA; a meta network is then materialized on the
            CPU (:func:`load_shards` with ``offload=True``).
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mp = MixedPrecisionPolicy() if mp_policy is None else mp_policy
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for block in blocks(net):
        fully_shard(block, mp_policy=mp, offload_policy=policy)
    fully_shard(net, mp_policy=mp, offload_policy=policy)
    return net


def is_offloaded(net: nn.Module) -> bool:
    """Whether ``net`` is sharded with FSDP2's ``CPUOffloadPolicy`` (its shards in host memory)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if not is_sharded(net):
        return False
    group = net._get_fsdp_state()._fsdp_param_group
    return group is not None and isinstance(group.offload_policy, CPUOffloadPolicy)


def process_group_backend(offload: bool) -> str:
    """The ``init_process_group`` backend: NCCL on CUDA (with gloo beside it for the reductions
    of host tensors under CPU offload: gradient norms, the EMA's gathers), else gloo."""
    if not torch.cuda.is_available():
        return "gloo"
    return "cuda:nccl,cpu:gloo" if offload else "nccl"


def _keep_fp32(cls: type, name: str) -> bool:
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def empty_network(cls: type, config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A diffusers network built from its config with every parameter on the meta device.

    Buffers are built for real (they are small, and non-persistent ones such as rotary tables
    are not in the safetensors file). Parameters get ``dtype``, except those of the class's
    ``_keep_in_fp32_modules``, which stay float32 as ``from_pretrained(torch_dtype=...)``
    keeps them.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        net = cls.from_config(config)
    finally:
        nn.Module.register_parameter = register
    if dtype != torch.float32:
        for name, p in net.named_parameters():
            if not _keep_fp32(cls, name):
                p.data = p.data.to(dtype)
    return net


def safetensors_files(folder: str | Path) -> dict[str, Path]:
    """Which ``*.safetensors`` file of a diffusers model folder holds each tensor (one file, or
    the shards an ``*.safetensors.index.json`` names)."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors file")
    from safetensors import safe_open

    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update({name: file for name in f.keys()})
    return where


def _local_rows(p: Tensor) -> tuple[int, int]:
    """The first row and the number of rows of ``p``'s global tensor this rank holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return (offset[0], shape[0]) if len(shape) else (0, 0)


@torch.no_grad()
def load_shards(
    net: nn.Module,
    folder: str | Path,
    device: torch.device | str = "cpu",
    *,
    via: dict[str, torch.dtype] | None = None,
    skip: str | None = None,
    offload: bool = False,
    names: dict[str, str] | None = None,
    base: nn.Module | None = None,
) -> nn.Module:
    """Materialize a sharded (or plain) network built by :func:`empty_network` on ``device`` and
    fill every parameter and persistent buffer from ``folder``'s safetensors: each rank reads
    only the rows of its shard.

    Args:
        net: The network, parameters on the meta device, sharded by :func:`shard_network`.
        folder: The model folder (``config.json`` + safetensors).
        device: Where the shards live.
        via: A dtype per parameter name to round the rows to before the parameter's own dtype
            (the student's float32 copy of a bfloat16 teacher equals ``teacher.to(float32)``).
        skip: Parameters whose name contains it are not in the file (LoRA's ``"lora_"``): left
            materialized but uninitialised, for the caller.
        offload: The parameters go to host memory and the buffers to ``device`` (a network
            sharded with ``offload=True``: FSDP2 copies each shard over for its all-gather).
        names: A parameter's name prefix → the file's (a wrapper's submodules: MeanFlow's
            student reads ``base.`` from ``""`` and ``r_embedder.`` from the timestep MLP's).
        base: A network sharded and loaded alike (the teacher): every frozen parameter of
            ``net`` (``requires_grad=False``, the base of a LoRA network) becomes ``base``'s
            own shard, the same storage, not read or held again (:func:`share_shards`). Its
            dtype must be ``base``'s; nothing may write to it.

    Raises:
        KeyError: A parameter the file does not hold, or a tensor of another shape (the message
            names the file and the tensor).
    """
    from safetensors import safe_open

    def in_file(name: str) -> str:
        name = name.replace(".base_layer.", ".")  # a peft layer's own weights: the file's
        for prefix, source in (names or {}).items():
            if name.startswith(prefix):
                return source + name[len(prefix) :]
        return name

    where = safetensors_files(folder)
    buffers = {n: b.detach().clone() for n, b in net.named_buffers(remove_duplicate=False)}
    net.to_empty(device="cpu" if offload else device)
    for prefix, module in net.named_modules():  # to_empty left them uninitialised
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = buffers[f"{prefix}.{key}" if prefix else key].to(device)
    shared = share_shards(net, base, in_file) if base is not None else set()
    handles = {}
    try:
        for name, p in net.named_parameters():
            if (skip is not None and skip in name) or name in shared:
                continue
            name = in_file(name)
            if name not in where:
                raise KeyError(f"{folder}: no tensor {name!r} in the safetensors files")
            file = where[name]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            view = handles[file].get_slice(name)
            if tuple(view.get_shape()) != tuple(p.shape):
                raise KeyError(
                    f"{file}: {name!r} has shape {tuple(view.get_shape())}, the network "
                    f"{tuple(p.shape)}"
                )
            if hasattr(p, "to_local"):
                start, rows = _local_rows(p)
                local = p.to_local()
                if rows == 0:
                    continue
                values = view[start : start + rows]
            else:
                local, values = p, view[:]
            if via is not None and name in via:
                values = values.to(via[name])
            local.copy_(values.to(local.dtype))
        persistent = set(net.state_dict()) - {n for n, _ in net.named_parameters()}
        for name in persistent:
            if in_file(name) in where:
                file = where[in_file(name)]
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt")
                net.get_buffer(name).copy_(handles[file].get_tensor(in_file(name)))
    finally:
        handles.clear()
    return net


def _fsdp_params(net: nn.Module) -> dict[tuple[int, str], Any]:
    """FSDP2's record of each sharded parameter of ``net``, by (module id, parameter name)."""
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for module in net.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else ():
                out[id(fp._module_info.module), fp._module_info.param_name] = fp
    return out


@torch.no_grad()
def share_shards(net: nn.Module, base: nn.Module, name_in_base: Callable[[str], str]) -> set[str]:
    """Make each frozen parameter of ``net`` (``requires_grad=False``) ``base``'s shard of the
    same name: the same storage, so a LoRA network over the teacher's weights holds only its
    adapters (FSDP2 all-gathers the one shard into each network's own block buffer).

    Both networks are sharded by :func:`shard_network` on the same ranks; ``base`` is loaded,
    ``net`` materialized. Returns the names of the parameters shared (the rest are left to
    load).

    Raises:
        ValueError: A frozen parameter whose counterpart in ``base`` has another dtype or
            shape, or is missing (the message names it).
    """
    from torch.distributed.tensor import DTensor

    mine, theirs = _fsdp_params(net), _fsdp_params(base)
    by_name = {}
    for prefix, module in base.named_modules():
        for key in module._parameters:
            fp = theirs.get((id(module), key))
            if fp is not None:
                fp.reset_sharded_param()  # its padded storage, as FSDP2's lazy init leaves it
                by_name[f"{prefix}.{key}" if prefix else key] = fp
    shared = set()
    for prefix, module in net.named_modules():
        for key, p in module._parameters.items():
            name = f"{prefix}.{key}" if prefix else key
            if p is None or p.requires_grad or not isinstance(p, DTensor):
                continue
            src, fp = by_name.get(name_in_base(name)), mine.get((id(module), key))
            if src is None or fp is None:
                raise ValueError(f"{name}: no sharded parameter {name_in_base(name)!r} to share")
            t = src.sharded_param
            if (t.dtype, t.shape, t.placements) != (p.dtype, p.shape, p.placements):
                raise ValueError(
                    f"{name}: {p.dtype} {tuple(p.shape)} {p.placements} cannot share "
                    f"{name_in_base(name)!r}'s {t.dtype} {tuple(t.shape)} {t.placements}"
                )
            p._local_tensor = t._local_tensor
            fp._sharded_param_data = src._sharded_param_data
            fp.reset_sharded_param()  # finds the one storage: keeps it (no copy)
            shared.add(name)
    return shared


@torch.no_grad()
def init_lora_shards(net: nn.Module) -> nn.Module:
    """Initialise the LoRA adapters of a network sharded on the meta device as peft does
    (``A`` Kaiming-uniform with ``a = sqrt(5)``, ``B = 0``), in module order from the global
    RNG: each rank draws the whole ``A`` and keeps its rows, so the shards are those of the
    adapters peft puts on a whole network."""
    for module in net.modules():
        for key, init in (("lora_A", "kaiming"), ("lora_B", "zeros")):
            layers = getattr(module, key, None)
            if not isinstance(layers, nn.ModuleDict):
                continue
            for layer in layers.values():
                w = layer.weight
                full = torch.empty(w.shape, dtype=w.dtype, device="cpu")
                if init == "kaiming":
                    nn.init.kaiming_uniform_(full, a=math.sqrt(5))
                else:
                    full.zero_()
                if hasattr(w, "to_local"):
                    start, rows = _local_rows(w)
                    if rows:
                        w.to_local().copy_(full[start : start + rows])
                else:
                    w.copy_(full)
    return net


def gathered_state_dict(net: nn.Module, *, rank0_only: bool = True) -> Iterator[tuple[str, Tensor]]:
    """``(name, full tensor on CPU)`` for every entry of a sharded ``net``'s state dict, one
    all-gather at a time: every rank must iterate it; with ``rank0_only`` the other ranks get
    ``(name, None)`` and keep nothing."""
    import torch.distributed as dist

    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    for name, p in net.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        yield name, full.detach().cpu().clone() if keep else None
        del full
    persistent = set(net.state_dict())
    for name, b in net.named_buffers():
        if name in persistent:
            yield name, b.detach().cpu().clone() if keep else None


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(path: str | Path, tensors: Iterator[tuple[str, Tensor]]) -> Path:
    """Write ``(name, tensor)`` pairs to a safetensors file as they come, holding one at a
    time: the data goes to ``path``'s side file first, then behind the header (which needs
    every offset) into ``path`` itself."""
    import shutil

    path = Path(path)
    data_file = path.with_name(path.name + ".data")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    with data_file.open("wb") as data:
        for name, t in tensors:
            if t.dtype not in _SAFETENSORS_DTYPES:
                raise TypeError(f"{name}: no safetensors dtype for {t.dtype}")
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            data.write(memoryview(raw.numpy()))
            header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + raw.numel()]}  # fmt: skip
            offset += raw.numel()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as out, data_file.open("rb") as data:
        out.write(len(head).to_bytes(8, "little"))
        out.write(head)
        shutil.copyfileobj(data, out, 1 << 20)
    data_file.unlink()
    return path


def lora_layers(net: nn.Module) -> dict[str, nn.Module] | None:
    """``net``'s peft LoRA layers by module name (``{}`` without adapters); ``None`` when one
    is not a plain ``Linear`` (:func:`merged_gathered` merges those only)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    layers = {n: m for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)}
    if any(not isinstance(m, LoraLinear) or m.fan_in_fan_out for m in layers.values()):
        return None
    return layers


def merged_gathered(
    net: nn.Module, adapter: dict[str, Tensor] | None = None, *, name: str = "default"
) -> Iterator[tuple[str, Tensor | None]]:
    r""":func:`gathered_state_dict` with each LoRA layer merged as
    :func:`fastgen.train.lora.merged` does (:math:`W + s\,BA` in the adapters' dtype, rounded
    once to :math:`W`'s), under the plain model's names; rank 0's adapter tensors go to
    ``adapter`` under peft's saved names. Every rank must iterate it; others get ``None``s."""
    layers = lora_layers(net) or {}
    pending: dict[str, dict[str, Tensor]] = {}
    for key, t in gathered_state_dict(net, rank0_only=True):
        layer = key.split(".lora_" if ".lora_" in key else ".base_layer.")[0]
        if layer == key or layer not in layers:
            yield key, t
            continue
        if ".lora_" in key:
            if t is not None and adapter is not None and f".{name}." in key:
                adapter[key.replace(f".{name}", "")] = t
            part = "A" if ".lora_A." in key else "B"
        else:
            part = key.split(".base_layer.")[1]
            if part != "weight":
                yield f"{layer}.{part}", t
                continue
        got = pending.setdefault(layer, {})
        got[part] = t
        if len(got) == 3:
            del pending[layer]
            if got["weight"] is None:
                yield f"{layer}.weight", None
                continue
            delta = (got["B"] @ got["A"]) * layers[layer].scaling[name]
            yield f"{layer}.weight", (got["weight"] + delta).to(got["weight"].dtype)
