"""The latent cache: precomputed latents and conditioning in ``*.safetensors`` shards.

The format, in full:

- a folder of ``*.safetensors`` files (shards), read in name order;
- every tensor is batch-first, and within a shard every tensor has the same batch size as
  ``latents``;
- ``latents`` (required): the clean latents ``x0`` the networks see, ``[N, ...]``;
- ``encoder_hidden_states``: the conditioning of every network call;
- a key starting with ``negative_`` is the unconditional teacher call's (CFG):
  ``negative_encoder_hidden_states`` and ``negative_<keyword>`` for any other keyword; its batch
  is ``N`` or 1 (one unconditional embedding shared by every sample);
- every other key is passed to the networks as a keyword argument of that name
  (``pooled_projections``, ``encoder_hidden_states_mask``, ``img_ids``, ...).

Write one with :func:`write_shard` (or ``safetensors.torch.save_file``). :class:`LatentCache`
streams it: the shards are memory-mapped, each rank reads its own share of every epoch's
permutation, and its position is a small dict saved in the run's checkpoints.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["PLACEHOLDER_KEY", "CacheError", "LatentCache", "verify_cache", "write_shard"]

NEGATIVE = "negative_"
PLACEHOLDER_KEY = "fastgen.latents"
HASH_PREFIX = "fastgen.sha256."


class CacheError(ValueError):
    """A cache folder or shard that does not follow the format; the message names the path and
    the key."""


def _check_tensors(tensors: dict[str, Tensor], where: str) -> int:
    """The batch size of ``tensors`` (``latents``'), after checking them against the format."""
    if "latents" not in tensors:
        raise CacheError(f"{where}: no 'latents' tensor (keys: {sorted(tensors)})")
    n = _batch(tensors["latents"], "latents", where)
    for key, value in tensors.items():
        b = _batch(value, key, where)
        if key.startswith(NEGATIVE) and b == 1:
            continue
        if b != n:
            raise CacheError(
                f"{where}: {key!r} has batch {b}, 'latents' has {n} (every tensor is batch-first"
                f"{'; a negative_ tensor may have batch 1' if key.startswith(NEGATIVE) else ''})"
            )
    return n


def _batch(value: Any, key: str, where: str) -> int:
    shape = value.shape if isinstance(value, Tensor) else value
    if len(shape) == 0:
        raise CacheError(f"{where}: {key!r} is 0-d; every tensor is batch-first")
    return int(shape[0])


def write_shard(
    path: str | Path, tensors: dict[str, Tensor], *, metadata: dict[str, str] | None = None
) -> Path:
    """Write one shard of a latent cache (checked against the format first), whole: to a
    temporary name, then renamed.

    Args:
        path: The shard's file (``.safetensors`` is appended when missing).
        tensors: ``latents`` and the conditioning, batch-first.
        metadata: safetensors' string metadata (``{"fastgen.latents": "placeholder"}`` marks
            ``latents`` that are zeros: a prompts-only cache). The SHA-256 of every tensor's
            bytes is added (``fastgen.sha256.<key>``), for :func:`verify_cache`.

    Returns:
        The file written.

    Raises:
        CacheError: No ``latents``, a 0-d tensor, or batch sizes that differ.

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_shard(f"{folder}/shard_0", {"latents": torch.zeros(4, 2, 8, 8),
        ...                                       "encoder_hidden_states": torch.zeros(4, 7, 16)})
        >>> LatentCache(folder, batch_size=2).samples
        4
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    _check_tensors(tensors, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    hashes = {f"{HASH_PREFIX}{k}": _sha256(v) for k, v in tensors.items()}
    save_file(tensors, str(tmp), {**(metadata or {}), **hashes})
    os.replace(tmp, path)
    return path


class LatentCache:
    """Batches from a latent cache folder, for one rank; a callable the trainer pulls from.

    Every epoch is a fresh permutation of all samples (seeded by ``seed`` and the epoch, the
    same on every rank); rank ``r`` of ``world`` takes every ``world``-th sample of it from
    position ``r``, in batches of ``batch_size``; the tail that would give the ranks unequal
    batch counts is left for the next epoch's permutation. Nothing is loaded up front: the
    shards are memory-mapped and each batch reads only its rows.

    Args:
        folder: The cache folder.
        batch_size: Samples per batch (per rank).
        rank: This process's rank.
        world: The number of processes.
        seed: The permutations' seed.
        shuffle: ``False`` reads the samples in order (epoch after epoch).

    Raises:
        CacheError: The folder is missing or holds no shard; a shard breaks the format; shards
            disagree on their keys or on a tensor's per-sample shape; fewer samples than one
            batch per rank.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CacheError(f"no cache folder {str(self.folder)!r}")
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise CacheError(f"cache folder {str(self.folder)!r} holds no *.safetensors shard")
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world, got {batch_size}, "
                             f"{rank}, {world}")  # fmt: skip
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self._handles = []
        sizes, keys, shapes, placeholder = [], None, {}, []
        for path in self.files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # a damaged or foreign file
                raise CacheError(f"{path}: not a readable safetensors file ({err})") from None
            shard = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            sizes.append(_check_tensors(shard, str(path)))
            if keys is None:
                keys = sorted(shard)
            elif sorted(shard) != keys:
                raise CacheError(f"{path}: keys {sorted(shard)} differ from {self.files[0].name}'s {keys}")  # fmt: skip
            for key, shape in shard.items():
                if shapes.setdefault(key, shape[1:]) != shape[1:]:
                    raise CacheError(
                        f"{path}: {key!r} has per-sample shape {shape[1:]}, "
                        f"{self.files[0].name} has {shapes[key]}"
                    )
            self._handles.append(handle)
            placeholder.append((handle.metadata() or {}).get(PLACEHOLDER_KEY) == "placeholder")
        self.keys = keys
        self.shapes: dict[str, tuple[int, ...]] = shapes
        """Every key's per-sample shape (no batch dimension)."""
        self.placeholder_latents = any(placeholder)
        """Whether ``latents`` are zeros (a prompts-only cache): fine for 1-step and
        backward-simulation students without the GAN branch, which never read them."""
        # negative_ tensors of batch 1 in every shard: one row, expanded to each batch
        self._shared = {
            k for k in keys if k.startswith(NEGATIVE)
            and all(_shard_batch(h, k) == 1 for h in self._handles)
        }  # fmt: skip
        self._starts = [0]
        for n in sizes:
            self._starts.append(self._starts[-1] + n)
        self.samples = self._starts[-1]
        self.batches_per_epoch = (self.samples // world) // batch_size
        if self.batches_per_epoch == 0:
            raise CacheError(
                f"cache folder {str(self.folder)!r} holds {self.samples} samples: fewer than one "
                f"batch of {batch_size} for each of {world} ranks"
            )
        self.epoch, self.position = 0, 0
        self._order: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(self.samples, generator=g)
            else:
                self._order = torch.arange(self.samples)
        return self._order

    def _row(self, key: str, index: int) -> Tensor:
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        handle = self._handles[shard]
        if _shard_batch(handle, key) == 1 and key.startswith(NEGATIVE):
            local = 0
        return handle.get_slice(key)[local : local + 1]

    def __call__(self) -> dict[str, Tensor]:
        """The next batch: ``{key: tensor [batch_size, ...]}`` (shared ``negative_`` tensors
        expanded to the batch)."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        mine = self._permutation()[self.rank :: self.world]
        start = self.position * self.batch_size
        indices = mine[start : start + self.batch_size].tolist()
        self.position += 1
        batch = {}
        for key in self.keys:
            if key in self._shared:
                row = self._handles[0].get_slice(key)[0:1]
                batch[key] = row.expand(len(indices), *row.shape[1:]).contiguous()
            else:
                batch[key] = torch.cat([self._row(key, i) for i in indices])
        return batch

    def locate(self, state: dict[str, int], row: int) -> tuple[Path, int]:
        """Where row ``row`` of the batch read from position ``state`` (:meth:`state_dict`
        before the read) comes from: the shard file and the sample's index in it."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        saved = self.epoch, self._order
        self.epoch, self._order = epoch, None
        try:
            mine = self._permutation()[self.rank :: self.world]
        finally:
            self.epoch, self._order = saved
        index = int(mine[position * self.batch_size + row])
        shard = bisect.bisect_right(self._starts, index) - 1
        return self.files[shard], index - self._starts[shard]

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch and the batches of it already read."""
        return {"epoch": self.epoch, "position": self.position, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict`'s position.

        Raises:
            CacheError: The state is of a cache with another number of samples.
        """
        if int(state.get("samples", self.samples)) != self.samples:
            raise CacheError(
                f"the checkpoint's data position is for {state['samples']} samples; "
                f"{str(self.folder)!r} holds {self.samples}"
            )
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def _sha256(tensor: Tensor) -> str:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def verify_cache(folder: str | Path) -> dict[str, int]:
    """Read a whole cache and check it: the format (as :class:`LatentCache` does), every
    tensor against the SHA-256 its shard recorded (shards written by :func:`write_shard`), and
    every floating-point value finite.

    Args:
        folder: The cache folder.

    Returns:
        ``{"samples", "shards", "hashed"}``: the counts checked (``hashed``: tensors with a
        recorded hash).

    Raises:
        CacheError: The first problem, naming the shard file, the key and (non-finite values)
            the sample.
    """
    cache = LatentCache(folder, batch_size=1)
    hashed = 0
    for path, handle in zip(cache.files, cache._handles):
        recorded = handle.metadata() or {}
        for key in cache.keys:
            try:
                tensor = handle.get_tensor(key)
            except Exception as err:  # a truncated or overwritten file
                raise CacheError(f"{path}: {key!r} cannot be read ({err})") from None
            want = recorded.get(HASH_PREFIX + key)
            if want is not None:
                hashed += 1
                if _sha256(tensor) != want:
                    raise CacheError(f"{path}: {key!r} does not match its recorded SHA-256")
            if tensor.is_floating_point():
                bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
                if bool(bad.any()):  # a whole-cache check, not a training step
                    row = int(bad.to(torch.int64).argmax())
                    raise CacheError(f"{path}: {key!r} of sample {row} holds NaN or inf")
    return {"samples": cache.samples, "shards": len(cache.files), "hashed": hashed}


def _shard_batch(handle: Any, key: str) -> int:
    return int(handle.get_slice(key).get_shape()[0])
