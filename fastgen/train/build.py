"""A run config to a ready :class:`~fastgen.train.Trainer`: the networks, the data, the call.

``fastgen distill`` is this plus argument parsing and reporting; a Python user writes
``trainer = fastgen.train.build(run)`` and gets the same run:

- **networks**: ``teacher:`` loads a diffusers folder (``from_pretrained``); the student and the
  fake score start as float32 copies of it (with ``lora:``, the teacher's own weights under
  each one's adapters: one base in memory; under FSDP2 too, each rank's shards of the base
  are the teacher's own), and with the GAN branch a token discriminator
  reads its middle block. ``model: "module:function"`` calls ``function(run)`` for a dict with
  ``teacher`` and optionally ``student``, ``fake_score``, ``discriminator``;
- **data**: ``data: {cache, batch_size}`` streams a latent cache (this rank's share);
  ``data: "module:function"`` calls ``function(run, rank, world)`` for a batch callable;
- **call**: the network call the teacher's class needs (Qwen-Image's packed one).

Every problem is a :class:`RunError` whose message names the config key or the path.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.dmd.config import DMDConfig
from fastgen.train.config import RunConfig

__all__ = ["RunError", "build", "build_data", "build_networks", "import_function"]


class RunError(ValueError):
    """A run config that cannot be built; the message names the key or the path."""


def _one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def import_function(spec: str, key: str) -> Callable:
    """The function a ``"module:function"`` string names (``key``: the config key, for errors)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RunError(f"{key}: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RunError(f"{key}: cannot import {module_name!r}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RunError(f"{key}: {module_name!r} has no function {attr!r}")
    return fn


def build_networks(run: RunConfig, dmd: Any) -> dict[str, nn.Module]:
    """``{"teacher", "student", "fake_score"[, "discriminator"]}`` for the run (see above);
    ``dmd`` is the method's config: sCM and MeanFlow have no fake score, MeanFlow's student is
    a :class:`~fastgen.consistency.MeanFlowNet` of the teacher's copy."""
    if run.teacher is not None:
        from fastgen.consistency.config import MeanFlowConfig, RCMConfig, SCMConfig
        from fastgen.train.folders import default_discriminator, load_teacher

        if _shards_from_folder(run):
            trainable = ["student"]
            if isinstance(dmd, RCMConfig) or not isinstance(dmd, SCMConfig | MeanFlowConfig):
                trainable.append("fake_score")
            nets = _sharded_networks(run, trainable, meanflow=isinstance(dmd, MeanFlowConfig))
            if isinstance(dmd, DMDConfig) and dmd.gan_loss_weight_gen > 0:
                try:
                    nets["discriminator"] = default_discriminator(nets["teacher"])
                except ValueError as err:
                    raise RunError(f"teacher: {err}") from None
            return nets
        try:
            teacher = load_teacher(run.teacher)
        except (OSError, ValueError) as err:
            raise RunError(_one_line(err)) from None
        from fastgen.train.lora import one_base, shared_base

        def trainable_copy() -> nn.Module:
            if one_base(run):
                return shared_base(teacher)
            return copy.deepcopy(teacher).to(torch.float32)

        nets = {"teacher": teacher, "student": trainable_copy()}
        if isinstance(dmd, MeanFlowConfig):
            from fastgen.consistency.networks import MeanFlowNet

            try:
                nets["student"] = MeanFlowNet(nets["student"])
            except ValueError as err:
                raise RunError(f"teacher: {err}") from None
        if isinstance(dmd, RCMConfig) or not isinstance(dmd, SCMConfig | MeanFlowConfig):
            nets["fake_score"] = trainable_copy()
        if isinstance(dmd, DMDConfig) and dmd.gan_loss_weight_gen > 0:
            try:
                nets["discriminator"] = default_discriminator(teacher)
            except ValueError as err:
                raise RunError(f"teacher: {err}") from None
        return nets
    if run.model is None:
        raise RunError(
            "teacher: required (a diffusers model folder), or model: ('module:function' "
            "building the networks)"
        )
    nets = import_function(run.model, "model")(run)
    if not isinstance(nets, dict) or "teacher" not in nets:
        raise RunError("model: the function must return a dict with 'teacher'")
    unknown = sorted(set(nets) - {"teacher", "student", "fake_score", "discriminator"})
    if unknown:
        raise RunError(f"model: unexpected networks {unknown}")
    return nets


def _shards_from_folder(run: RunConfig) -> bool:
    """Whether the run's networks are built on the meta device and filled shard by shard:
    FSDP2 with a teacher folder."""
    return run.parallel == "fsdp2" and run.teacher is not None


def _sharded_networks(
    run: RunConfig, trainable: list[str], *, meanflow: bool = False
) -> dict[str, nn.Module]:
    """The teacher (its dtype) and float32 ``trainable`` copies of it, each built on the meta
    device, sharded per block and filled from the folder's safetensors, this rank's rows only;
    with ``lora:`` the copies' frozen base is the teacher's own shards (one base in memory,
    :func:`~fastgen.train.sharding.share_shards`) and they carry float32 adapters, initialised
    as peft does. With ``meanflow`` the
    student is a :class:`~fastgen.consistency.MeanFlowNet` whose ``r_embedder`` is filled from
    the timestep MLP's rows, its last layer zero."""
    import torch.distributed as dist

    from fastgen.consistency.networks import MeanFlowNet
    from fastgen.train.folders import _DTYPES, _model_class
    from fastgen.train.lora import add_lora
    from fastgen.train.sharding import (
        empty_network,
        init_lora_shards,
        load_shards,
        mixed_precision,
        process_group_backend,
        shard_network,
    )

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise RunError("parallel: fsdp2 runs under torchrun (torchrun --nproc_per_node=N ...)")
        dist.init_process_group(process_group_backend(run.cpu_offload))
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
              if torch.cuda.is_available() else torch.device("cpu"))  # fmt: skip
    folder = Path(run.teacher.path) / (run.teacher.subfolder or "")
    try:
        cls = _model_class(run.teacher.class_name, folder, "teacher")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunError(_one_line(err)) from None
    mp, offload = mixed_precision(run.precision), run.cpu_offload
    # with LoRA nothing of the base trains: the copies' base is the teacher's shards, so it
    # is built in the teacher's dtype
    teacher_dtype = _DTYPES[run.teacher.dtype]
    base_dtype = teacher_dtype if run.lora is not None else torch.float32
    try:
        teacher = empty_network(cls, config, teacher_dtype).requires_grad_(False)
        shard_network(teacher.eval(), mp, offload=offload)
        nets = {"teacher": load_shards(teacher, folder, device, offload=offload)}
        via = {name: p.dtype for name, p in teacher.named_parameters()}
        for name in trainable:
            net = empty_network(cls, config, base_dtype).eval()
            if meanflow and name == "student":
                try:
                    net = MeanFlowNet(net)
                except ValueError as err:
                    raise RunError(f"teacher: {err}") from None
            if run.lora is not None:  # adapters before sharding: FSDP2 shards them too
                add_lora(net, run.lora)
                if isinstance(net, MeanFlowNet):  # its new embedding of t - r trains
                    net.r_embedder.requires_grad_(True)
            names = net.weight_sources() if isinstance(net, MeanFlowNet) else None
            # with LoRA the frozen base is the teacher's own shards (one base in memory)
            load_shards(shard_network(net, mp, offload=offload), folder, device, via=via,
                        skip="lora_", offload=offload, names=names,
                        base=teacher if run.lora is not None else None)  # fmt: skip
            if isinstance(net, MeanFlowNet):
                net.zero_r_output()
            nets[name] = init_lora_shards(net) if run.lora is not None else net
    except (OSError, KeyError) as err:
        raise RunError(f"teacher: {_one_line(err)}") from None
    return nets


def build_data(run: RunConfig, rank: int, world: int, dmd: Any = None) -> Any:
    """This rank's batch callable for the run (see above). With ``dmd`` (the method's config),
    a prompts-only cache is refused for recipes that read real latents (the consistency family
    always does: its losses noise the data)."""
    if run.data is None:
        raise RunError("data: required ({cache, batch_size} or 'module:function')")
    if isinstance(run.data, str):
        return import_function(run.data, "data")(run, rank, world)
    from fastgen.cache import CacheError, LatentCache

    try:
        data = LatentCache(run.data.cache, batch_size=run.data.batch_size, rank=rank,
                           world=world, seed=run.seed or 0, shuffle=run.data.shuffle)  # fmt: skip
    except CacheError as err:
        raise RunError(f"data.cache: {err}") from None
    reads_latents = dmd is not None and (
        not isinstance(dmd, DMDConfig)  # the consistency family noises the data itself
        or dmd.gan_loss_weight_gen > 0
        or (dmd.student_sample_steps > 1 and not dmd.backward_simulation)
    )
    if reads_latents and getattr(data, "placeholder_latents", False):
        raise RunError(
            f"data.cache: {run.data.cache!r} holds placeholder latents (a prompts-only cache); "
            "this recipe reads real latents (the consistency family, the GAN branch, or a "
            "multi-step student without backward_simulation): encode images with fastgen "
            "cache --images"
        )
    return data


def build(run: RunConfig, *, rank: int | None = None, world: int | None = None) -> Any:
    """The :class:`~fastgen.train.Trainer` of a run config, as ``fastgen distill`` builds it.

    Args:
        run: The run config.
        rank, world: This process's rank and the number of processes (default: torchrun's
            ``RANK`` and ``WORLD_SIZE``, else 0 and 1).

    Raises:
        pydantic.ValidationError: The recipe with the ``dmd`` overrides is not a valid config.
        RunError: A network, data or path problem (the message names the key or the path).
    """
    from fastgen.train.trainer import Trainer

    if not isinstance(run, RunConfig):
        raise TypeError(f"run must be a RunConfig, got {type(run).__name__}")
    try:
        dmd = run.method_config()
    except FileNotFoundError as err:
        raise RunError(f"recipe: {err}") from None
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if run.model is None and run.teacher is None:
        build_networks(run, dmd)  # raises the one-line error
    data = build_data(run, rank, world, dmd)
    torch.manual_seed(run.seed or 0)  # the same initial weights on every rank
    nets = build_networks(run, dmd)
    call = None
    if run.teacher is not None:
        from fastgen.train.folders import call_for

        call = call_for(type(nets["teacher"]).__name__)
    config = getattr(nets["teacher"], "config", None)
    if hasattr(data, "shapes") and isinstance(config, Mapping):  # before step 1, not in conv2d
        from fastgen.cache import CacheError
        from fastgen.train.data_checks import check_cache_against_config

        try:
            check_cache_against_config(data.shapes, config,
                                       packs_patches=getattr(call, "packs_patches", False))  # fmt: skip
        except CacheError as err:
            raise RunError(str(err)) from None
    try:
        return Trainer(run, data=data, dmd=dmd, call=call, **nets)
    except (ValueError, TypeError) as err:  # the run config against the networks it got
        raise RunError(_one_line(err)) from None
