"""The DMD2 loop above :class:`~fastgen.DMDPipeline`: alternation, optimizers, EMA, clipping,
schedules, compile, bf16, DDP/FSDP2, checkpoints and resume, logs and validation samples.

The caller's networks and the pipeline stay plain objects; the trainer owns only the loop.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastgen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.factory import create_fake_score
from fastgen.dmd.pipeline import DMDPipeline
from fastgen.train.config import EvalConfig, OptimizerConfig, RunConfig
from fastgen.train.data_checks import NonFiniteDataError, checked_keys, nonfinite_rows
from fastgen.train.determinism import deterministic_kernels
from fastgen.train.images import image_grid, write_png
from fastgen.train.lora import _copy_sharing, add_lora, has_lora, one_base, shared_base
from fastgen.train.monitor import Monitor, encode_prompts, load_decoder, pipeline_folder
from fastgen.train.preemption import Preempted, PreemptionNotice
from fastgen.train.recipes import method_of
from fastgen.train.sharding import (
    blocks,
    checkpoint_blocks,
    compiled_block,
    gathered_state_dict,
    is_sharded,
    mixed_precision,
    process_group_backend,
    shard_network,
)

__all__ = ["CollapseError", "NonFiniteLossError", "Trainer"]

Batch = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the loss and the iteration."""


class CollapseError(RuntimeError):
    """The collapse alarm fired with ``eval.stop_on_collapse``; the message says why and names
    the last checkpoint from before the low streak."""


def _rebuildable(net: nn.Module) -> bool:
    """A diffusers network (adapters and all; or MeanFlow's wrapper of one): its class rebuilds
    it from ``net.config`` (:func:`_empty_copy`)."""
    from fastgen.consistency.networks import MeanFlowNet

    if isinstance(net, MeanFlowNet):
        return _rebuildable(net.base)
    return type(net).__module__.split(".")[0] == "diffusers" and hasattr(net, "config")


def _empty_copy(net: nn.Module) -> nn.Module:
    """``net``'s network rebuilt on the meta device (a diffusers class from its config; MeanFlow's
    wrapper around such a one), to be filled with ``load_state_dict(..., assign=True)``."""
    from fastgen.consistency.networks import MeanFlowNet
    from fastgen.train.sharding import empty_network

    if isinstance(net, MeanFlowNet):
        return MeanFlowNet(_empty_copy(net.base))
    return empty_network(type(net), dict(net.config))


def _trainable(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def _lr_lambda(run: RunConfig, opt: OptimizerConfig) -> Callable[[int], float]:
    warmup, steps = run.optim.warmup, run.steps

    def factor(i: int) -> float:  # i: scheduler steps taken (iterations done)
        if warmup and i < warmup:
            return (i + 1) / warmup
        if opt.schedule == "constant":
            return 1.0
        progress = min(1.0, (i - warmup) / max(1, steps - warmup))
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Runs DMD2 for ``run.steps`` iterations and saves, resumes, logs and samples as it goes.

    One iteration: ``dmd.student_update_freq`` fake-score updates (each followed by a
    discriminator update with the GAN branch), one student update, one EMA update, one LR
    scheduler step. Batches come from ``data()``, a dict with ``latents`` (required),
    ``encoder_hidden_states``, keys starting with ``negative_`` for the unconditional teacher
    call (``negative_encoder_hidden_states`` and ``negative_<kwarg>``), and every other key
    passed to the networks as a keyword argument. The student's input noise is drawn here. A
    ``data`` object with ``state_dict()``/``load_state_dict()`` has its position checkpointed.

    Args:
        run: The run config.
        teacher: The pretrained network (frozen here).
        data: ``() -> batch dict``, this rank's data.
        student: Initial student (default: a copy of the teacher).
        fake_score: Initial fake score (default: a copy of the teacher).
        discriminator: Required with the GAN branch (and a feature capture on the teacher).
        dmd: The DMD2 config (default: ``run.dmd_config()``).
        device: Where to train (default: this rank's CUDA device if there is one, else CPU).
        call: How the networks are called (:class:`~fastgen.dmd.calls.NetworkCall`; Qwen-Image:
            :class:`fastgen.plugins.qwen_image.QwenImageCall`), for training and samples.
    """

    def __init__(
        self,
        run: RunConfig,
        *,
        teacher: nn.Module,
        data: Callable[[], Batch],
        student: nn.Module | None = None,
        fake_score: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        dmd: DMDConfig | None = None,
        device: torch.device | str | None = None,
        call: NetworkCall | None = None,
    ) -> None:
        if not isinstance(run, RunConfig):
            raise TypeError(f"run must be a RunConfig, got {type(run).__name__}")
        if not callable(data):
            raise TypeError(
                f"data must be a callable returning a batch dict, got {type(data).__name__}"
            )
        self.run = run
        self.dmd = run.method_config() if dmd is None else dmd
        self.method = method_of(self.dmd)
        consistency = self.method != "dmd2"
        self.data = data
        self.out = Path(run.out)
        self._setup_distributed()
        if device is not None:
            self.device = torch.device(device)
        device = self.device
        if consistency and discriminator is not None:
            raise ValueError(f"discriminator: {self.method} has no GAN branch")
        if self.method in ("scm", "meanflow") and fake_score is not None:
            raise ValueError(f"fake_score: {self.method} trains none (rcm and dmd2 do)")
        # with LoRA the student and the fake score are the teacher's weights plus adapters:
        # one base in memory (the teacher carries no adapter)
        lora_copy = shared_base if one_base(run) else None
        if student is None:
            student = copy.deepcopy(teacher) if lora_copy is None else lora_copy(teacher)
            if self.method == "meanflow":
                from fastgen.consistency.networks import MeanFlowNet

                student = MeanFlowNet(student)
        if fake_score is None and self.method in ("dmd2", "rcm"):
            fake_score = (create_fake_score(teacher) if lora_copy is None
                          else lora_copy(teacher).train())  # fmt: skip
        if run.lora is not None:  # only the adapters train (build may have put them on)
            for net in (student, fake_score):
                if net is not None and not has_lora(net):
                    add_lora(net, run.lora)
            if hasattr(student, "r_embedder"):  # MeanFlow's embedding of t - r is new: it trains
                student.r_embedder.requires_grad_(True)
        else:
            student.requires_grad_(True)
        student.train()
        if run.activation_checkpointing:
            for net in (student, fake_score):
                if net is not None:
                    checkpoint_blocks(net)
        self._plain_student = student
        # ema_student()'s plain copy: made when asked, from the student itself, or under FSDP2
        # rebuilt from the class's config; a student FSDP2 will shard that cannot be rebuilt
        # (no diffusers config, adapters) is copied now, before the wrapping.
        self._ema_net: nn.Module | None = None
        if run.parallel == "fsdp2" and not is_sharded(student) and not _rebuildable(student):
            self._ema_net = copy.deepcopy(student).requires_grad_(False).eval()
        weight_net = None
        if self.method in ("scm", "rcm"):
            from fastgen.consistency.scm import AdaptiveWeight

            weight_net = AdaptiveWeight(seed=run.seed or 0).to(device)
        # a network fastgen.train.build sharded is where it belongs (host memory, offloaded)
        nets = [n if is_sharded(n) else n.to(device)
                for n in (teacher, student, fake_score) if n is not None]  # fmt: skip
        if discriminator is not None:
            discriminator.to(device)
        self._params = {"student": _trainable(student)}
        if fake_score is not None:
            self._params["fake_score"] = _trainable(fake_score)
        if discriminator is not None:
            self._params["discriminator"] = list(discriminator.parameters())
        if weight_net is not None:
            self._params["weight_net"] = list(weight_net.parameters())
        if run.parallel == "fsdp2":
            mp = mixed_precision(run.precision)
            for net in nets:
                if not is_sharded(net):  # fastgen.train.build shards a folder's networks itself
                    shard_network(net, mp, offload=run.cpu_offload)
            # the sharded parameters are new objects
            self._params["student"] = _trainable(student)
            if fake_score is not None:
                self._params["fake_score"] = _trainable(fake_score)
        wrap = self._ddp if run.parallel == "ddp" else (lambda m: m)
        # small networks stay replicated (DDP) under FSDP2 too
        replicated = self._ddp if run.parallel != "none" else (lambda m: m)
        disc = None if discriminator is None else replicated(discriminator)
        if consistency:
            from fastgen.train.methods import ConsistencyPipeline

            self.pipeline = ConsistencyPipeline(
                wrap(student), teacher, self.dmd,
                fake_score=None if fake_score is None else wrap(fake_score),
                weight_net=None if weight_net is None else replicated(weight_net), call=call,
            )  # fmt: skip
        else:
            self.pipeline = DMDPipeline(wrap(student), teacher, wrap(fake_score), self.dmd,
                                        discriminator=disc, call=call)  # fmt: skip
        self._call = call
        self.optimizers = {}
        for name, params in self._params.items():
            # the adaptive weighting trains with the student's loss, at the student's settings
            o = getattr(run.optim, "student" if name == "weight_net" else name)
            self.optimizers[name] = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps,
                                                      weight_decay=o.weight_decay)  # fmt: skip
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(
                opt,
                _lr_lambda(run, getattr(run.optim, "student" if name == "weight_net" else name)),
            )
            for name, opt in self.optimizers.items()
        }
        # which optimizers each loss steps
        self._groups = {name: [name] for name in self._params if name != "weight_net"}
        if weight_net is not None:
            self._groups["student"].append("weight_net")
        pipe = self.pipeline
        self.losses = {"student": pipe.compute_student_loss}
        if fake_score is not None:
            self.losses["fake_score"] = pipe.compute_fake_score_loss
        if discriminator is not None:
            self.losses["discriminator"] = pipe.compute_discriminator_loss
        if run.compile and run.parallel == "fsdp2":
            # dynamo does not trace FSDP2's hooks (they are marked to be skipped), so a loss
            # cannot be one graph: each transformer block compiles whole, the hooks run around it
            for net in nets:
                for block in blocks(net):
                    block.forward = compiled_block(block.forward)
        elif run.compile:
            # DDP's own forward cannot be traced whole: graph breaks around it there.
            full = run.parallel != "ddp"
            self.losses = {k: torch.compile(f, fullgraph=full) for k, f in self.losses.items()}
        self._bad: dict[str, Tensor] = {}
        self._last: dict[str, dict[str, Tensor]] = {}
        self._norms: dict[str, Tensor] = {}
        self._writer = None
        self._wandb = None
        self._bar = None
        self._scalars = {}
        self._seen_batch = 0
        self._lrs: dict[str, float] = {}
        self._viewer: Monitor | None = None  # the validation grid's fixed samples
        self._monitor: Monitor | None = None  # the evaluations (eval:)
        self._scope = ExitStack()  # what begin() turns on and end() turns off
        self._bad_data: Tensor | None = None  # [call, row, key] of the first non-finite sample
        self._positions: list[dict | None] = []  # the data's position before each call
        self._batch_keys: list[str] = []
        self._done = 0
        self._calls_per_iteration = self._updates_per_iteration()

    # --- setup ----------------------------------------------------------------------------

    def _fake_score_updates(self) -> int:
        """Fake-score updates per iteration (each followed by a discriminator update)."""
        if self.method == "dmd2":
            return self.dmd.student_update_freq
        return self.pipeline.fake_score_updates

    def _updates_per_iteration(self) -> int:
        return self._fake_score_updates() * (2 if "discriminator" in self._params else 1) + 1

    def _setup_distributed(self) -> None:
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if self.run.parallel == "none":
            if world_env > 1:
                raise ValueError(
                    f"running on {world_env} processes with parallel: none; set parallel: ddp "
                    "or parallel: fsdp2 in the run config"
                )
            self.rank, self.world = 0, 1
            self.device = torch.device("cuda" if cuda else "cpu")
            return
        if not dist.is_initialized():
            if "WORLD_SIZE" not in os.environ:
                raise ValueError(
                    f"parallel: {self.run.parallel} runs under torchrun "
                    "(torchrun --nproc_per_node=N ...)"
                )
            dist.init_process_group(process_group_backend(self.run.cpu_offload))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cuda:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    def _ddp(self, net: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids)

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that logs and samples)."""
        return self.rank == 0

    # --- one update -----------------------------------------------------------------------

    def _batch(self) -> tuple[Tensor, Tensor | None, dict, dict]:
        # the data's position before the read: where a bad sample came from, if one shows up
        self._positions.append(self.data.state_dict() if hasattr(self.data, "state_dict") else None)
        batch = self.data()
        if not isinstance(batch, dict) or "latents" not in batch:
            raise ValueError("data() must return a dict with 'latents' (and conditioning keys)")
        moved = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        if self._bad_data is None:
            self._bad_data = torch.full((3,), -1, dtype=torch.int64, device=self.device)
        self._bad_data = nonfinite_rows(moved, self._bad_data, len(self._positions) - 1)
        self._batch_keys = checked_keys(moved)
        latents = moved.pop("latents")
        ehs = moved.pop("encoder_hidden_states", None)
        negative = {k[len("negative_"):]: moved.pop(k) for k in list(moved) if k.startswith("negative_")}  # fmt: skip
        return latents, ehs, moved, negative

    def _autocast(self):
        if self.run.precision == "bf16" and self.run.parallel != "fsdp2":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _update(self, name: str, iteration: int) -> None:
        latents, ehs, kwargs, negative = self._batch()
        noise = torch.randn_like(latents)
        self._seen_batch = latents.shape[0]
        extra = {}
        if name == "student" and negative:
            neg_ehs = negative.pop("encoder_hidden_states", None)
            if neg_ehs is not None:
                extra["negative_encoder_hidden_states"] = neg_ehs
            if negative:
                extra["negative_model_kwargs"] = negative
        if name == "student" and self.method != "dmd2":
            # a 0-d tensor for the tangent warmup: a Python int would recompile per value
            extra["iteration"] = torch.tensor(iteration, device=self.device)
        with self._autocast():
            out = self.losses[name](latents, noise, ehs, **extra, **kwargs)
        loss = out["total"]
        group = self._groups[name]
        for net in group:
            self.optimizers[net].zero_grad(set_to_none=True)
        loss.backward()
        clip = self.run.optim.grad_clip
        for net in group:
            if clip is not None:
                self._norms[net] = torch.nn.utils.clip_grad_norm_(self._params[net], clip)
            elif iteration % self.run.log.every == 0 or iteration == self.run.steps:
                # without clipping the norm is only read when it is logged
                grads = [p.grad for p in self._params[net] if p.grad is not None]
                self._norms[net] = torch.nn.utils.get_total_norm(grads)
            self.optimizers[net].step()
        self._last[name] = {k: v.detach() for k, v in out.items()}
        # The first non-finite iteration, kept on the device (read at log and save time only).
        bad = self._bad.get(name)
        if bad is None:
            bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
        self._bad[name] = torch.where(
            (bad < 0) & ~torch.isfinite(loss.detach().float()), iteration, bad
        )

    def _check_data(self, done: int) -> None:
        """Raise on the first non-finite batch since the last check (one host read)."""
        positions, self._positions = self._positions, []
        if self._bad_data is None:
            return
        call, row, key = (int(v) for v in self._bad_data.tolist())
        if call < 0:
            return
        first = done - len(positions) // self._calls_per_iteration + 1
        iteration = first + call // self._calls_per_iteration
        name = self._batch_keys[key] if key < len(self._batch_keys) else "a tensor"
        where = f"sample {row} of the batch"
        if hasattr(self.data, "locate") and positions[call] is not None:
            shard, index = self.data.locate(positions[call], row)
            where = f"sample {index} of {shard}"
        last = latest_checkpoint(self.out / "checkpoints")
        raise NonFiniteDataError(
            f"the data holds a non-finite value: {name!r} of {where} (a batch of iteration "
            f"{iteration}); stopped without saving. The latest checkpoint is {last or 'none'}"
        )

    def _check_finite(self) -> None:
        self._check_data(self._done)
        for name, bad in self._bad.items():
            step = int(bad)
            if step >= 0:
                last = latest_checkpoint(self.out / "checkpoints")
                raise NonFiniteLossError(
                    f"the {name} loss is not finite (NaN or inf) at iteration {step}; stopped "
                    f"without saving. The latest checkpoint is {last or 'none'}"
                )

    # --- outputs --------------------------------------------------------------------------

    def _log(self, done: int, seconds_per_it: float) -> dict[str, float]:
        scalars = {}
        for name, out in self._last.items():
            for key, value in out.items():
                scalars[f"loss/{name}/{key}"] = float(value)
        for name, norm in self._norms.items():
            scalars[f"grad_norm/{name}"] = float(
                norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            )
        for name, lr in self._lrs.items():
            scalars[f"lr/{name}"] = lr
        batch = self._seen_batch
        updates = self._updates_per_iteration()
        scalars["time/seconds_per_iteration"] = seconds_per_it
        scalars["time/samples_per_second"] = (
            batch * updates * self.world / max(seconds_per_it, 1e-12)
        )
        if self.device.type == "cuda":
            scalars["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            scalars["memory/peak_rss_gib"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            )
        if self.main and self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, done)
            self._writer.flush()
        if self.main and self._wandb is not None:
            self._wandb.log(scalars, step=done)
        return scalars

    def _samples_visible(self) -> bool:
        # A sharded teacher (FSDP2) samples on every rank (its forward gathers); otherwise
        # rank 0 alone samples and writes.
        return self.main or self.run.parallel == "fsdp2"

    def _validate(self, done: int) -> None:
        viewer = self._viewer
        if viewer is None or self.pipeline.ema is None:
            return
        rows = {}
        if self.run.validation.teacher_steps is not None:
            teacher = viewer.teacher_samples(self.pipeline.teacher)
            rows["teacher"] = (
                teacher["pictures"] if teacher["pictures"] is not None else teacher["x"]
            )
        with self._ema_weights() as student:
            for steps, s in viewer.student_samples(student).items():
                rows[f"{steps}_step"] = s["pictures"] if s["pictures"] is not None else s["x"]
        if not self.main:
            return
        grids, pictures = {}, viewer.decoder is not None
        for name, x in rows.items():
            if x.ndim not in (4, 5):  # packed tokens without a decoder: no picture
                grids[name] = x.float().cpu()
                continue
            # decoded pictures are in [0, 1]; image_grid reads 3 channels as [-1, 1]
            grids[name] = image_grid(x.float().cpu() * 2 - 1 if pictures else x.float().cpu())
            if self._writer is not None:
                self._writer.add_image(f"samples/{name}", grids[name], done)
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        if all(g.ndim == 3 and g.shape[0] == 3 for g in grids.values()):
            # one row per sampler: the teacher (if asked), the student at 1 and K steps
            png = folder / f"step_{done:08d}.png"
            write_png(png, torch.cat(list(grids.values()), dim=1))
            if self._wandb is not None:
                import wandb

                array = torch.cat(list(grids.values()), dim=1).permute(1, 2, 0).numpy()
                self._wandb.log(
                    {"samples": wandb.Image(array, caption=", ".join(grids))}, step=done
                )
        torch.save(grids, folder / f"step_{done:08d}.pt")

    def _evaluate(self, done: int) -> None:
        monitor = self._monitor
        if monitor is None or self.pipeline.ema is None:
            self._stop_if(False, "")
            return
        with self._ema_weights() as student:
            report = monitor.evaluate(done, student, self.pipeline.teacher)
        alarm = report["alarm"]
        if self.main:
            scalars = {f"eval/{k}": v for k, v in report["figures"].items()}
            if self._writer is not None:
                for key, value in scalars.items():
                    self._writer.add_scalar(key, value, done)
                if alarm["collapsed"]:
                    self._writer.add_text("eval/alarm", alarm["reason"], done)
                self._writer.flush()
            if self._wandb is not None:
                self._wandb.log(scalars | ({"eval/alarm": alarm["reason"]} if alarm["collapsed"] else {}),
                                step=done)  # fmt: skip
            (self.out / "eval.json").write_text(json.dumps(monitor.history, indent=1) + "\n")
            if alarm["collapsed"]:
                print(f"fastgen: collapse alarm at iteration {done}: {alarm['reason']}", flush=True)
        self._stop_if(alarm["collapsed"] and self.run.eval.stop_on_collapse, alarm["reason"])

    def _stop_if(self, stop: bool, reason: str) -> None:
        """Stop every rank when rank 0's evaluation says so (one broadcast per evaluation)."""
        if self.world > 1 and self.run.eval.every is not None:
            box = [stop, reason]
            dist.broadcast_object_list(box, src=0)
            stop, reason = box
        if stop:
            good = self._good_checkpoint()
            raise CollapseError(
                f"stopped: {reason}. The last checkpoint from before the low streak is "
                f"{good or 'none'}"
            )

    def _good_checkpoint(self) -> Path | None:
        """The newest checkpoint saved at or before the last evaluation that was not low."""
        healthy = self._monitor.last_healthy_step() if self._monitor is not None else None
        root = self.out / "checkpoints"
        if healthy is None or not root.is_dir():
            return None
        steps = [p for p in root.iterdir() if p.name.startswith("step_")
                 and int(p.name.split("_")[1]) <= healthy]  # fmt: skip
        return max(steps) if steps else None

    def _protected(self) -> set[str]:
        """Checkpoints the rotation keeps besides the newest: the best by ``checkpoint.best``
        and, with ``eval.stop_on_collapse``, the last one from before a low streak."""
        names: set[str] = set()
        monitor, ckpt = self._monitor, self.run.checkpoint
        if monitor is None:
            return names
        if ckpt.best is not None:
            names |= {f"step_{s:08d}" for s in monitor.best(ckpt.best, ckpt.best_keep)}
        if self.run.eval.stop_on_collapse and (good := self._good_checkpoint()) is not None:
            names.add(good.name)
        return names

    def _save(self, done: int) -> Path:
        root = self.out / "checkpoints"
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        extra = {"data": data_state}
        if self._monitor is not None and self.main:
            extra["monitor"] = self._monitor.state_dict()
        path = save_checkpoint(root / f"step_{done:08d}", pipeline=self.pipeline,
                               optimizers=self.optimizers, schedulers=self.schedulers, step=done,
                               extra={**extra, **self._conditions()})  # fmt: skip
        self._saved_at = time.monotonic()
        keep = self.run.checkpoint.keep
        if self.main:
            for stale in list(root.glob(".*.tmp")) + list(root.glob(".*.old")):
                shutil.rmtree(stale, ignore_errors=True)  # saves killed before they published
            done_steps = sorted(
                p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            if keep is not None:
                protected = self._protected()
                for old in done_steps[:-keep]:
                    if old.name not in protected:
                        shutil.rmtree(old, ignore_errors=True)
        return path

    def _resume(self, fresh: bool) -> int:
        root = self.out / "checkpoints"
        if fresh and self.main and root.exists():
            shutil.rmtree(root)
        if self.world > 1:
            dist.barrier()
        last = None if fresh else latest_checkpoint(root)
        if last is None:
            return 0
        info = load_checkpoint(last, pipeline=self.pipeline, optimizers=self.optimizers,
                               schedulers=self.schedulers)  # fmt: skip
        data_state = (info.extra or {}).get("data")
        if data_state is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(data_state)
        monitor_state = (info.extra or {}).get("monitor")
        if monitor_state is not None and self._monitor is not None:
            self._monitor.load_state_dict(monitor_state)
        if self.main:
            print(f"resumed from step {info.step} ({last})", flush=True)
            notes = self._resume_notes(info.extra or {})
            if notes:
                print(f"note: this resumed run may differ in the last bits from one that never "
                      f"stopped: {'; '.join(notes)}", flush=True)  # fmt: skip
        return info.step

    def _monitors(self) -> tuple[Monitor | None, Monitor | None]:
        """The validation grid's and the evaluations' fixed samples, from one batch of the data
        drawn apart from the training's random stream, decoded by the teacher's pipeline folder
        when it has one."""
        run = self.run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((run.seed or 0) + 7)
            batch = self.data()
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        folder = pipeline_folder(run.teacher)
        decoder = load_decoder(folder, self.device) if folder is not None else None

        def make(config: EvalConfig, prompts: list[str] | None) -> Monitor:
            conditioning = negative = None
            if prompts:
                if folder is None:
                    raise ValueError("prompts as text need a teacher from a pipeline folder "
                                     "(teacher: {path, subfolder}) to encode them")  # fmt: skip
                conditioning, negative = encode_prompts(folder, prompts, self.device)
            clip = features = None
            if config.clip is not None:
                from fastgen.eval.features import ClipScorer

                clip = ClipScorer(config.clip, sha256=config.clip_sha256)
                features = clip.image_embeds
            elif config.fid_weights is not None:
                from fastgen.eval.features import FeatureNet

                features = FeatureNet(config.fid_weights, sha256=config.fid_sha256)
            return Monitor(config, self.dmd, batch, call=self._call, decoder=decoder,
                           conditioning=conditioning, negative=negative or None,
                           texts=prompts, features=features, clip=clip)  # fmt: skip

        viewer = monitor = None
        if run.validation.every is not None:
            v = run.validation
            viewer = make(EvalConfig(samples=v.samples, seeds=1, seed=(run.seed or 0) + 7,
                                     teacher_steps=v.teacher_steps or 1), v.prompts)  # fmt: skip
        if run.eval.every is not None:
            monitor = make(run.eval, run.eval.prompts)
        return viewer, monitor

    def _conditions(self) -> dict[str, Any]:
        """What the bitwise resume depends on besides the checkpoint (saved in its extra)."""
        return {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "deterministic": self.run.deterministic}  # fmt: skip

    def _resume_notes(self, saved: dict[str, Any]) -> list[str]:
        now, notes = self._conditions(), []
        if saved.get("torch", now["torch"]) != now["torch"]:
            notes.append(f"saved with torch {saved['torch']}, resumed with {now['torch']}")
        if self.device.type == "cpu" and saved.get("threads", now["threads"]) != now["threads"]:
            notes.append(f"saved on {saved['threads']} CPU threads, resumed on {now['threads']} "
                         "(CPU kernels split their reductions by thread)")  # fmt: skip
        if self.run.compile and not self.run.deterministic:
            notes.append("compiled with deterministic: false (compiled scatters add in a varying "
                         "order)")  # fmt: skip
        return notes

    # --- the loop -------------------------------------------------------------------------

    def begin(self, *, fresh: bool = False) -> int:
        """Prepare the run folder, resume (or start over), open the logs; returns the first
        iteration to run. :meth:`fit` calls it; a custom loop calls it, then
        :meth:`run_iteration` and :meth:`after_iteration` per iteration, then :meth:`end`."""
        run = self.run
        self.out.mkdir(parents=True, exist_ok=True)
        # On before the first compiled call: inductor reads the flag when it compiles.
        self._scope.enter_context(deterministic_kernels(run.deterministic))
        self._notice = self._scope.enter_context(PreemptionNotice(run.checkpoint.signals))
        self._saved_at = time.monotonic()
        if run.seed is not None:
            torch.manual_seed(run.seed + 1000 * self.rank)  # each rank its own data and noise
        if self.main:
            import yaml

            (self.out / "config.yaml").write_text(
                yaml.safe_dump(json.loads(run.model_dump_json()), sort_keys=False)
            )
            if self.method == "dmd2":
                (self.out / "dmd.yaml").write_text(self.dmd.to_yaml())
            else:
                (self.out / f"{self.method}.yaml").write_text(self.pipeline.to_yaml())
        self._viewer = self._monitor = None
        if (
            run.validation.every is not None or run.eval.every is not None
        ) and self._samples_visible():
            self._viewer, self._monitor = self._monitors()
        start = self._resume(fresh)
        self._writer = None
        self._wandb = None
        if self.main and run.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=start + 1)
        if self.main and run.log.wandb:
            import wandb

            self._wandb = wandb.init(project=run.log.wandb_project, dir=str(self.out),
                                     config=json.loads(run.model_dump_json()), resume="allow")  # fmt: skip
        self._bar = None
        if self.main and run.log.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=run.steps, initial=start, desc=run.log.name, dynamic_ncols=True)
        self._scalars: dict[str, float] = {}
        self._tick, self._ticked = time.perf_counter(), start
        return start

    def run_iteration(self, iteration: int) -> None:
        """One iteration's updates (0-based ``iteration``): the fake-score (and discriminator)
        updates, the student update, the LR schedulers' step, the EMA update."""
        for _ in range(self._fake_score_updates()):
            self._update("fake_score", iteration + 1)
            if "discriminator" in self._params:
                self._update("discriminator", iteration + 1)
        self._update("student", iteration + 1)
        # the learning rates this iteration used (logged), then the next iteration's
        self._lrs = {n: sched.get_last_lr()[0] for n, sched in self.schedulers.items()}
        for sched in self.schedulers.values():
            sched.step()
        self.pipeline.update_ema()

    def after_iteration(self, done: int) -> None:
        """What follows iteration ``done`` (1-based): the finiteness check, logs, checkpoint,
        validation samples and the progress bar, each on its schedule."""
        run = self.run
        last = done == run.steps
        self._done = done
        if done % run.log.every == 0 or last:
            self._check_finite()
            now = time.perf_counter()
            self._scalars = self._log(done, (now - self._tick) / max(1, done - self._ticked))
            self._tick, self._ticked = now, done
            if self._bar is not None:
                losses = {k.split("/", 1)[1]: f"{v:.3g}" for k, v in self._scalars.items()
                          if k.startswith("loss/") and k.endswith("/total")}  # fmt: skip
                rate = 1 / max(self._scalars["time/seconds_per_iteration"], 1e-9)
                self._bar.set_postfix(losses | {"it/s": f"{rate:.2f}"})
        if run.eval.every is not None and (done % run.eval.every == 0 or last):
            self._evaluate(done)  # before the save: a collapsed state is not saved
        stop, due = self._stop_or_due(done)
        if done % run.checkpoint.every == 0 or last or due or stop is not None:
            self._check_finite()
            path = self._save(done)
            if stop is not None:
                raise Preempted(stop, done, path)
        if run.validation.every is not None and (done % run.validation.every == 0 or last):
            self._validate(done)
        if self._bar is not None:
            self._bar.update()

    def _stop_or_due(self, done: int) -> tuple[str | None, bool]:
        """The preemption notice received (its name) and whether a timed save is due.

        One process reads both after every iteration (Python state: no host sync). Ranks must
        agree, and may have received the notice between different iterations: they read it at
        logging iterations, where the step already synchronizes, with one all-reduce.
        """
        minutes = self.run.checkpoint.every_minutes
        due = minutes is not None and time.monotonic() - self._saved_at >= 60 * minutes
        stop = self._notice.received
        if self.world == 1:
            return stop, due
        if done % self.run.log.every != 0:
            return None, False
        flags = torch.tensor([stop is not None, due], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        any_stop, any_due = flags.tolist()
        return (stop or "a preemption notice") if any_stop else None, bool(any_due)

    def end(self) -> None:
        """Close the progress bar and the logs; restore the caller's determinism setting."""
        self._scope.close()
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()

    def fit(self, *, fresh: bool = False) -> dict[str, Any]:
        """Run (or resume) to ``run.steps`` iterations.

        Args:
            fresh: Start over: delete ``out/checkpoints`` instead of resuming from it.

        Returns:
            ``{"step", "resumed_from", "scalars"}`` (the last logged scalars).

        Raises:
            NonFiniteLossError: A loss became NaN or inf (nothing is saved after it).
            NonFiniteDataError: A batch held NaN or inf (checked with the losses; the message
                names the key, the sample and, from a latent cache, its shard).
            Preempted: A preemption notice (``run.checkpoint.signals``) arrived; the run saved
                after the iteration under way and stopped.
        """
        start = 0
        try:
            start = self.begin(fresh=fresh)
            for it in range(start, self.run.steps):
                self.run_iteration(it)
                self.after_iteration(it + 1)
        finally:
            self.end()
        return {"step": self.run.steps, "resumed_from": start, "scalars": self._scalars}

    @contextmanager
    def _ema_weights(self):
        """The student itself holding the EMA weights (in eval mode), its own restored after:
        swapped in place where shadow and weight agree in shape and dtype, else copied in over
        a backup of this rank's (local) weights. No second copy of the network."""
        student, ema = self._plain_student, self.pipeline.ema
        training = student.training
        backup = None
        if ema is not None and not ema.swap(student):
            with torch.no_grad():
                backup = [t.to_local().clone() if hasattr(t, "to_local") else t.detach().clone()
                          for t in (*student.parameters(), *student.buffers())]  # fmt: skip
            ema.copy_to(student)
        # frozen while it samples, like a plain copy: kernels may differ for weights that need
        # gradients (a linear layer's, on CPU), and samples would depend on the training state
        needs_grad = [p.requires_grad for p in student.parameters()]
        student.eval().requires_grad_(False)
        try:
            yield student
        finally:
            student.train(training)
            for p, flag in zip(student.parameters(), needs_grad):
                p.requires_grad_(flag)
            with torch.no_grad():
                if backup is not None:
                    for t, held in zip((*student.parameters(), *student.buffers()), backup):
                        (t.to_local() if hasattr(t, "to_local") else t).copy_(held)
                elif ema is not None:
                    ema.swap(student)

    def export(self) -> Path | None:
        """Save the EMA student to ``out/export`` (:func:`~fastgen.train.folders.export_student`:
        the diffusers folder, LoRA merged and the adapter alone, the pipeline folder and
        ``fastgen.json``); rank 0 writes and gets the folder, the others ``None``, and every
        rank ``None`` when the student is no diffusers model (no ``save_pretrained``).

        Under FSDP2 every rank must call it: a diffusers student's weights are all-gathered one
        tensor at a time straight into the file, so no rank holds a whole copy.
        """
        from fastgen.train.folders import export_sharded_student, export_student
        from fastgen.train.sharding import lora_layers

        student = self._plain_student
        if not hasattr(student, "save_pretrained"):
            return None
        if (
            is_sharded(student)
            and hasattr(student, "save_config")
            and lora_layers(student) is not None
        ):
            with self._ema_weights():
                return export_sharded_student(student, self.out, self.dmd, self.run.teacher)
        sharded = is_sharded(student)
        net = self.ema_student(rank0_only=True) if sharded or self.main else None
        if not self.main:
            return None
        return export_student(net, self.out, self.dmd, self.run.teacher)

    def ema_student(self, *, rank0_only: bool = False) -> nn.Module | None:
        """A plain copy of the student holding the EMA weights (the student's own weights when
        the config has no EMA); a LoRA student's copy has its own adapters over the student's
        frozen base (the same tensors, not copies: the base never changes).

        Under FSDP2 every rank must call it: the weights are all-gathered one tensor at a time
        into a plain network rebuilt from the student's class and config; with ``rank0_only``
        only rank 0 builds it and the others get ``None``.
        """
        student = self._plain_student
        if not is_sharded(student):
            if self._ema_net is None:  # a LoRA student's copy shares its frozen base
                frozen = [p for p in student.parameters() if not p.requires_grad]
                self._ema_net = _copy_sharing(student, frozen).requires_grad_(False).eval()
            if self.pipeline.ema is not None:
                self.pipeline.ema.copy_to(self._ema_net)
            else:
                self._ema_net.load_state_dict(student.state_dict())
            return self._ema_net
        with self._ema_weights():
            state = dict(gathered_state_dict(student, rank0_only=rank0_only))
        if rank0_only and not self.main:
            return None
        if self._ema_net is not None:  # the copy made before sharding
            self._ema_net.load_state_dict(state)
            return self._ema_net
        net = _empty_copy(student)
        if has_lora(student):
            add_lora(net, student._fastgen_lora)
        net.load_state_dict(state, assign=True)
        return net.requires_grad_(False).eval()
