"""Checkpoints of a whole DMD2 run: atomic, verified, sharded through
``torch.distributed.checkpoint`` (DCP), so a resumed run is bitwise the run that never stopped.

A checkpoint is a directory:

- ``.metadata``, ``__<rank>_<n>.distcp``: DCP's files, the pipeline's state
  (:meth:`~fastgen.DMDPipeline.state_dict`) and every optimizer's, each rank writing its own
  shards (FSDP2) or one rank writing replicated tensors once (DDP, one process);
- ``rng/rank_<r>.pt``: each process's RNG states (torch CPU, CUDA, Python's ``random``, numpy's);
- ``meta.json``: the step, ``extra``, the LR schedulers' states, the world size, the fastgen
  version; ``config.yaml``: the pipeline's :class:`~fastgen.DMDConfig`;
- ``manifest.json``, written last: the size and SHA-256 of every other file.

It is written into a hidden sibling (``.<name>.tmp``), every file flushed and fsynced, and
renamed into place last, so a crash at any moment leaves either the whole new checkpoint or no
new checkpoint where :func:`latest_checkpoint` looks. Loading verifies the manifest and checks
every key and shape against the live objects before it writes anything into them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastgen.dmd.pipeline import DMDPipeline
from fastgen.dmd.state import check_state, load_network_state, network_state
from fastgen.errors import CheckpointError
from fastgen.version import __version__

__all__ = ["CheckpointError", "CheckpointInfo", "latest_checkpoint", "load_checkpoint",
           "load_ema_weights", "save_checkpoint"]  # fmt: skip

FORMAT = "fastgen-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_checkpoint` read besides the state it restored."""

    path: Path
    """The checkpoint directory."""
    step: int
    """The ``step`` it was saved with."""
    extra: Any
    """The ``extra`` it was saved with (JSON types)."""
    world_size: int
    """How many processes saved it."""
    fastgen_version: str
    """The fastgen version that saved it."""
    rng_restored: bool
    """Whether this process's RNG states were restored (``False`` when this rank did not exist
    in the saving run: a checkpoint of fewer ranks)."""


# --- small helpers ----------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    _, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _raise_first(errors: list[str | None]) -> None:
    """Raise the first rank's error on every rank (all ranks take the same path)."""
    for error in errors:
        if error is not None:
            raise CheckpointError(error)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _root_cause(err: BaseException) -> BaseException:
    failures = getattr(err, "failures", None)  # DCP's CheckpointException: rank -> (exc, tb)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        first = first[0] if isinstance(first, tuple) and first else first
        err = first if isinstance(first, BaseException) else err
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
    )


@contextlib.contextmanager
def _dcp_quiet() -> Iterator[None]:
    # DCP warns that it runs "in a single process" whenever no process group is up: expected.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _owner(name: str, opt: torch.optim.Optimizer, nets: Mapping[str, nn.Module]) -> str:
    """The pipeline network whose parameters ``opt`` updates (one network per optimizer: the
    optimizer's state is saved under that network's parameter names)."""
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    for net_name, net in nets.items():
        if ids <= {id(p) for p in net.parameters()}:
            return net_name
    raise ValueError(
        f"optimizers[{name!r}] updates parameters that are not all in one of the pipeline's "
        f"networks ({', '.join(nets)}): give each network its own optimizer"
    )


def _reshard(nets: Mapping[str, nn.Module]) -> None:
    """Put every FSDP2 module back in its sharded state. An FSDP2 root keeps its parameters
    unsharded after a forward without backward (the teacher-style no-grad calls of a student
    loss): its registered parameters are then not the DTensors its optimizer updates."""
    from torch.distributed.fsdp import FSDPModule

    for net in nets.values():
        for module in net.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _networks(pipeline, modules) -> dict[str, nn.Module]:
    """The pipeline's trained networks and the extra ``modules``, by name."""
    if pipeline is None and not modules:
        raise TypeError("give a pipeline= (a DMDPipeline) or modules= (a dict name -> nn.Module)")
    if pipeline is not None and not all(
        hasattr(pipeline, a) for a in ("networks", "state_dict", "load_state_dict", "ema")
    ):
        # a DMDPipeline, or the trainer's consistency pipeline (the same state methods)
        raise TypeError(f"pipeline must be a DMDPipeline, got {type(pipeline).__name__}")
    modules = {} if modules is None else modules
    if not isinstance(modules, Mapping):
        raise TypeError(f"modules must be a dict name -> nn.Module, got {type(modules).__name__}")
    nets = {} if pipeline is None else pipeline.networks()
    for name, module in modules.items():
        if not isinstance(name, str) or not isinstance(module, nn.Module):
            raise TypeError(f"modules[{name!r}] must be an nn.Module, got {type(module).__name__}")
        if name in nets:
            raise ValueError(f"modules[{name!r}]: the pipeline has a network of that name")
        nets[name] = module
    return nets


def _check_args(optimizers, schedulers) -> tuple[dict, dict]:
    optimizers = {} if optimizers is None else optimizers
    schedulers = {} if schedulers is None else schedulers
    if not isinstance(optimizers, Mapping):
        raise TypeError(
            f"optimizers must be a dict name -> optimizer, got {type(optimizers).__name__}"
        )
    if not isinstance(schedulers, Mapping):
        raise TypeError(
            f"schedulers must be a dict name -> scheduler, got {type(schedulers).__name__}"
        )
    for name, opt in optimizers.items():
        if not isinstance(name, str) or not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizers[{name!r}] must be a torch.optim.Optimizer, got {type(opt).__name__}"
            )
    for name, sched in schedulers.items():
        if not isinstance(name, str) or not callable(getattr(sched, "state_dict", None)):
            raise TypeError(
                f"schedulers[{name!r}] must be an LR scheduler (with state_dict), got {type(sched).__name__}"
            )
    return dict(optimizers), dict(schedulers)  # fmt: skip


def _optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, opt)


# --- RNG ------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, gauss = sys.modules["numpy"].random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        # numpy's legacy global RNG is the state a user's np.random calls draw from
        state_np = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
        np.random.set_state(state_np)  # noqa: NPY002


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


# --- save -----------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    pipeline: DMDPipeline | None = None,
    modules: Mapping[str, nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    step: int,
    extra: Any = None,
) -> Path:
    """Write a checkpoint of the whole run to the directory ``path``, atomically.

    Under ``torch.distributed`` every rank calls it (it is collective): each writes its shards
    and its RNG states, then rank 0 writes the manifest and publishes the directory. An existing
    checkpoint at ``path`` is replaced (it is out of view only between two renames).

    Args:
        path: The checkpoint directory to create (its parent is created if needed).
        pipeline: The DMD2 pipeline (student, fake score, discriminator, EMA; not the teacher).
        modules: Other networks to save by name (for example a teacher being pretrained);
            ``pipeline``, ``modules`` or both.
        optimizers: Name -> optimizer; each updates parameters of one network.
        schedulers: Name -> LR scheduler.
        step: The run's step count (an int >= 0), returned on load.
        extra: JSON-serialisable data returned on load (for example the data position).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: A bad argument (the message names it), or ``extra`` is not JSON data.
        ValueError: An optimizer updates parameters of no single pipeline network.
        CheckpointError: A scheduler's state is not JSON data.
    """
    optimizers, schedulers = _check_args(optimizers, schedulers)
    nets = _networks(pipeline, modules)
    modules = dict(modules or {})
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"step must be an int >= 0, got {step!r}")
    try:
        extra_json = json.loads(json.dumps(extra))
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra must be JSON data (dicts, lists, str, numbers): {err}") from None
    _reshard(nets)
    owners = {name: _owner(name, opt, nets) for name, opt in optimizers.items()}
    sched_states = {}
    for name, sched in schedulers.items():
        try:
            sched_states[name] = json.loads(json.dumps(sched.state_dict()))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"schedulers[{name!r}]'s state is not JSON data: {err}") from None

    import torch.distributed.checkpoint as dcp

    rank, world = _rank_world()
    final = Path(path)
    tmp = final.parent / f".{final.name}.tmp"
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a save that was killed before it published
        (tmp / "rng").mkdir(parents=True)
    _barrier()

    state: dict[str, Any] = {
        "optimizers": {name: _optimizer_state(nets[owners[name]], opt) for name, opt in optimizers.items()},
        "modules": {name: network_state(module) for name, module in modules.items()},
    }  # fmt: skip
    if pipeline is not None:
        state["pipeline"] = pipeline.state_dict()
    try:
        with _dcp_quiet():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    except OSError:
        raise
    except Exception as err:  # DCP wraps each rank's failure (a full disk): name the folder
        cause = _root_cause(err)
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, cause.filename or str(tmp)) from err
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        raise CheckpointError(f"{tmp}: the save failed: {lines[0]}") from err
    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    _write(tmp / _rng_file(rank), buffer.getvalue())
    if rank == 0:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fastgen_version": __version__,
            "torch_version": torch.__version__,
            "step": step,
            "extra": extra_json,
            "world_size": world,
            "pipeline": pipeline is not None,
            "sections": sorted(k for k in state.get("pipeline", {}) if k in (*nets, "ema")),
            "modules": sorted(modules),
            "optimizers": {name: {"network": owners[name]} for name in optimizers},
            "schedulers": sched_states,
        }
        _write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        if pipeline is not None:
            text = pipeline.to_yaml() if hasattr(pipeline, "to_yaml") else pipeline.config.to_yaml()
            _write(tmp / "config.yaml", text.encode())
    _barrier()

    # Every rank hashes its share of the files; rank 0 writes the manifest last.
    files = _files(tmp)
    mine = {rel: {"size": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)}
            for rel in files[rank::world]}  # fmt: skip
    entries = {}
    for part in _gather(mine):
        entries.update(part)
    if rank == 0:
        manifest = {"format": FORMAT, "step": step, "world_size": world, "files": entries}
        _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync(tmp / "rng")
        _fsync(tmp)
        old = final.parent / f".{final.name}.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return final


# --- find -----------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint")
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        int(manifest["step"])
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a fastgen checkpoint manifest")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file} is damaged: {err}") from None
    return manifest


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directly under ``root``, by step (``None`` if none).

    Temporaries (hidden ``.<name>.tmp`` directories of a save that did not finish) and
    directories without a readable manifest are ignored.

    Example:
        >>> latest_checkpoint("no/such/folder") is None
        True
    """
    if not isinstance(root, (str, Path)):
        raise TypeError(f"root must be a str or Path, got {type(root).__name__}")
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, str] | None = None
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            step = int(_read_manifest(child)["step"])
        except CheckpointError:
            continue
        if best is None or (step, child.name) > best:
            best = (step, child.name)
    return None if best is None else root / best[1]


# --- load -----------------------------------------------------------------------------------


def _verify(path: Path, manifest: dict[str, Any]) -> None:
    """Sizes and checksums of every file in the manifest, each rank a share of them."""
    rank, world = _rank_world()
    error = None
    for rel in sorted(manifest["files"])[rank::world]:
        entry, file = manifest["files"][rel], path / rel
        if not file.is_file():
            error = f"{file} is missing (listed in {MANIFEST})"
        elif file.stat().st_size != entry["size"]:
            error = (f"{file} is damaged: {file.stat().st_size} bytes, {MANIFEST} says "
                     f"{entry['size']} (truncated or overwritten)")  # fmt: skip
        elif _sha256(file) != entry["sha256"]:
            error = f"{file} is damaged: its SHA-256 does not match {MANIFEST}"
        if error:
            break
    _raise_first(_gather(error))


def _saved(metadata: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}  # fmt: skip


def _check_optimizer(name: str, net: nn.Module, saved: Mapping[str, Any], file: Path) -> None:
    """The saved optimizer state names parameters of ``net`` with their shapes."""
    params = network_state(net)
    for key, value in _saved(saved, "state.").items():
        fqn = key.rsplit(".", 1)[0]
        if fqn not in params:
            raise CheckpointError(
                f"{file}: optimizers[{name!r}] holds state for {fqn!r}, which is not a "
                "parameter of its network"
            )
        shape = tuple(getattr(value, "size", ()) or ())
        if shape not in ((), tuple(params[fqn].shape)):
            raise CheckpointError(
                f"{file}: optimizers[{name!r}] state {key!r} has shape {shape}, the parameter "
                f"{tuple(params[fqn].shape)}"
            )


def load_checkpoint(
    path: str | Path,
    *,
    pipeline: DMDPipeline | None = None,
    modules: Mapping[str, nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Restore a checkpoint written by :func:`save_checkpoint`, in place, RNG included.

    First the manifest: every file's size and SHA-256. Then every key and shape against the
    live pipeline and optimizers. Only then are the networks, EMA, optimizers, schedulers and
    this process's RNG states written, so the next random draw is the one the uninterrupted
    run made. Under ``torch.distributed`` every rank calls it; DCP reshards, so a checkpoint of
    2 FSDP2 ranks loads on 1 and back.

    Args:
        path: A checkpoint directory (for example :func:`latest_checkpoint`'s answer).
        pipeline: The pipeline to restore, built as for the saved run (the teacher loaded).
        modules: The other networks saved, by the same names.
        optimizers: Name -> optimizer, each one of those saved.
        schedulers: Name -> LR scheduler, each one of those saved.

    Returns:
        :class:`CheckpointInfo` with ``step`` and ``extra``.

    Raises:
        CheckpointError: A missing or damaged file (named), a network, EMA or optimizer whose
            keys or shapes do not match (the key named), a discriminator or EMA in the
            checkpoint and not in the pipeline or the other way round, an optimizer or
            scheduler name the checkpoint does not have. Nothing live is changed.
    """
    optimizers, schedulers = _check_args(optimizers, schedulers)
    nets = _networks(pipeline, modules)
    modules = dict(modules or {})
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    manifest = _read_manifest(path)
    _verify(path, manifest)

    import torch.distributed.checkpoint as dcp

    meta = json.loads((path / "meta.json").read_text())
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    rank, _ = _rank_world()
    rng_path = path / _rng_file(rank)
    rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None

    # Everything checked before anything live is written.
    _reshard(nets)
    if bool(meta.get("pipeline", True)) != (pipeline is not None):
        raise CheckpointError(
            f"{path} holds {'a' if meta.get('pipeline', True) else 'no'} DMD2 pipeline state "
            f"but pipeline= is {'not ' if pipeline is None else ''}given"
        )
    if sorted(meta.get("modules", [])) != sorted(modules):
        raise CheckpointError(
            f"{path} holds the modules {sorted(meta.get('modules', []))}, given {sorted(modules)}"
        )
    sections = set(meta["sections"])
    if pipeline is not None:
        for name, has in (("discriminator", getattr(pipeline, "discriminator", None)),
                          ("ema", pipeline.ema)):  # fmt: skip
            if name in sections and has is None:
                raise CheckpointError(f"{path} holds a {name} but the pipeline has none")
            if name not in sections and has is not None:
                raise CheckpointError(f"the pipeline has a {name} but {path} holds none")
    for name, net in nets.items():
        prefix = f"modules.{name}." if name in modules else f"pipeline.{name}."
        check_state(f"{path}: {name}", network_state(net), _saved(metadata, prefix))
    if pipeline is not None and pipeline.ema is not None:
        check_state(
            f"{path}: ema", pipeline.ema.sharded_state_dict(), _saved(metadata, "pipeline.ema.")
        )
    owners = {name: _owner(name, opt, nets) for name, opt in optimizers.items()}
    for name in optimizers:
        if name not in meta["optimizers"]:
            raise CheckpointError(
                f"{path} has no optimizer {name!r} (it has {sorted(meta['optimizers'])})"
            )
        owner = owners[name]
        if owner != meta["optimizers"][name]["network"]:
            raise CheckpointError(
                f"{path}: optimizers[{name!r}] updated the {meta['optimizers'][name]['network']}"
                f" there, here the {owner}"
            )
        _check_optimizer(name, nets[owner], _saved(metadata, f"optimizers.{name}."), path)
    for name in schedulers:
        if name not in meta["schedulers"]:
            raise CheckpointError(
                f"{path} has no scheduler {name!r} (it has {sorted(meta['schedulers'])})"
            )

    # An optimizer that never stepped gets its state made (zero-lr step) to be loaded into;
    # if its saved keys still differ (another optimizer class), that is undone.
    fresh = [opt for opt in optimizers.values() if not opt.state]
    template_opts = {}
    try:
        for name, opt in optimizers.items():
            template_opts[name] = _optimizer_state(nets[owners[name]], opt)
            flat = {k for k in metadata if k.startswith(f"optimizers.{name}.state.")}
            want = {f"optimizers.{name}.state.{fqn}.{key}"
                    for fqn, st in template_opts[name]["state"].items() for key in st}  # fmt: skip
            # Parameters that never had a gradient have no saved state: none is loaded for them.
            if not flat <= want:
                extra_keys = sorted(flat - want)[:3]
                raise CheckpointError(
                    f"{path}: optimizers[{name!r}] does not match the saved optimizer state "
                    f"(keys {extra_keys} are not in it): another optimizer class?"
                )
            states = template_opts[name]["state"]
            for fqn in list(states):
                if not any(f"optimizers.{name}.state.{fqn}.{key}" in flat for key in states[fqn]):
                    del states[fqn]
    except CheckpointError:
        for opt in fresh:
            opt.state.clear()
        raise

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict[str, Any] = {
        "optimizers": template_opts,
        "modules": {name: network_state(module) for name, module in modules.items()},
    }
    if pipeline is not None:
        state["pipeline"] = pipeline.state_dict()
    with _dcp_quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    if pipeline is not None:
        pipeline.load_state_dict(state["pipeline"])
    for name, module in modules.items():
        load_network_state(module, state["modules"][name])
    for name, opt in optimizers.items():
        # strict=False: parameters that never had a gradient have no state to load
        set_optimizer_state_dict(nets[owners[name]], opt, state["optimizers"][name],
                                 options=StateDictOptions(strict=False))  # fmt: skip
    for name, sched in schedulers.items():
        sched.load_state_dict(meta["schedulers"][name])
    if rng is not None:
        _set_rng_state(rng)
    return CheckpointInfo(
        path=path,
        step=int(meta["step"]),
        extra=meta["extra"],
        world_size=int(meta["world_size"]),
        fastgen_version=str(meta["fastgen_version"]),
        rng_restored=rng is not None,
    )


def load_ema_weights(path: str | Path, net: nn.Module, config: Any) -> CheckpointInfo:
    """Write a checkpoint's EMA student into ``net`` (a plain copy of the student), alone.

    The manifest is verified first; then only the EMA shadows are read (DCP loads the keys it
    is asked for), so an evaluation of a checkpoint needs neither the fake score nor the
    optimizers.

    Args:
        path: A checkpoint directory of a run with an EMA.
        net: A network of the student's architecture (its weights are replaced).
        config: The run's :class:`~fastgen.EMAConfig`.

    Returns:
        :class:`CheckpointInfo` (the step; no RNG is restored).

    Raises:
        CheckpointError: A missing or damaged file, or a checkpoint without EMA shadows for
            ``net``'s parameters.
    """
    import torch.distributed.checkpoint as dcp

    from fastgen.dmd.ema import ExponentialMovingAverage

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    manifest = _read_manifest(path)
    _verify(path, manifest)
    ema = ExponentialMovingAverage(net, config)
    shadows = ema.sharded_state_dict()
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in shadows if f"pipeline.ema.{k}" not in saved]
    if missing:
        raise CheckpointError(f"{path} has no EMA shadow for {missing[0]!r} (and {len(missing) - 1} more)"
                              if len(missing) > 1 else f"{path} has no EMA shadow for {missing[0]!r}")  # fmt: skip
    state = {"pipeline": {"ema": shadows}}
    with _dcp_quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    ema.copy_to(net)
    meta = json.loads((path / "meta.json").read_text())
    return CheckpointInfo(path=path, step=int(meta["step"]), extra=meta.get("extra"),
                          world_size=int(meta.get("world_size", 1)),
                          fastgen_version=str(meta.get("fastgen_version", "")),
                          rng_restored=False)  # fmt: skip
