"""A few DMD2 iterations on 2 gloo ranks: ``torchrun --nproc_per_node=2 tests/dmd_distributed_worker.py
--wrap {ddp,fsdp2}``. Run by tests/test_dmd_distributed.py; rank 0 prints one JSON line.

Each iteration: ``student_update_freq`` fake-score and discriminator updates, one student update
(4-step student, backward simulation, CFG, GAN with R1), one EMA update. The student, fake score
and teacher are wrapped in DDP or sharded with FSDP2 (the discriminator is replicated with DDP).
Checks: every rank made the same network calls, the ranks drew different data, the weights are
the same on every rank and moved, and the EMA (FSDP2: both modes) equals an EMA of the gathered
weights computed here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toys import ToyDiT, ToyTokenDiscriminator

import fastgen
from fastgen import DMDConfig, DMDPipeline, EMAConfig, ExponentialMovingAverage
from fastgen.dmd.ema import ema_decay


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wrap", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights everywhere
    teacher = ToyDiT()
    student, fake = copy.deepcopy(teacher), fastgen.create_fake_score(teacher)
    disc = ToyTokenDiscriminator()
    fastgen.attach_feature_capture(teacher, [0, 1], blocks="transformer_blocks")

    calls = {"n": 0}
    for net in (student, teacher, fake):
        net.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))

    if args.wrap == "ddp":
        student_w, fake_w = (
            nn.parallel.DistributedDataParallel(student),
            nn.parallel.DistributedDataParallel(fake),
        )
        teacher_w = teacher
    else:
        from torch.distributed.fsdp import fully_shard

        for net in (student, fake, teacher):
            for block in net.transformer_blocks:
                fully_shard(block)
            fully_shard(net)
        student_w, fake_w, teacher_w = student, fake, teacher
    disc_w = nn.parallel.DistributedDataParallel(disc)

    cfg = DMDConfig(
        guidance_scale=2.0,
        student_sample_steps=4,
        backward_simulation=True,
        student_update_freq=2,
        gan_loss_weight_gen=0.03,
        gan_r1_reg_weight=10.0,
        sample_t_cfg={"time_dist_type": "shifted", "t_list": fastgen.make_t_list(4, shift=5.0)},
        ema=EMAConfig(decay=0.9, mode="full_tensor"),
    )
    pipe = DMDPipeline(student_w, teacher_w, fake_w, cfg, discriminator=disc_w)
    local_ema = ExponentialMovingAverage(student, EMAConfig(decay=0.9, mode="local_shard"))
    opt_s = torch.optim.Adam(student.parameters(), lr=1e-3)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    initial = {n: full(p).clone() for n, p in student.named_parameters()}
    reference: dict[str, torch.Tensor] = {}

    torch.manual_seed(100 + rank)  # each rank its own data, noise and timesteps
    losses = []
    for it in range(1, args.iters + 1):
        for _ in range(cfg.student_update_freq):
            latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
            cond = torch.randn(3, 3, 8)
            for opt, loss in (
                (opt_f, pipe.compute_fake_score_loss(latents, noise, cond)["total"]),
                (opt_d, pipe.compute_discriminator_loss(latents, noise, cond)["total"]),
            ):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        latents, noise, cond = (
            torch.randn(3, 4, 8, 8),
            torch.randn(3, 4, 8, 8),
            torch.randn(3, 3, 8),
        )
        out = pipe.compute_student_loss(
            latents, noise, cond, negative_encoder_hidden_states=torch.zeros_like(cond)
        )
        opt_s.zero_grad(set_to_none=True)
        out["total"].backward()
        assert all(p.grad is None for p in teacher.parameters())
        opt_s.step()
        pipe.update_ema()
        local_ema.update(student, iteration=it)
        losses.append(float(out["vsd"]))
        gathered = {n: full(p) for n, p in student.named_parameters()}
        beta = ema_decay(cfg.ema, it)
        for n, w in gathered.items():
            reference[n] = w.clone() if it == 1 else beta * reference[n] + (1 - beta) * w

    def gathered_objects(obj):
        objs = [None] * world
        dist.all_gather_object(objs, obj)
        return objs

    weights = {n: full(p) for n, p in student.named_parameters()}
    checksums = gathered_objects(sum(float(w.double().sum()) for w in weights.values()))
    call_counts = gathered_objects(calls["n"])
    all_losses = gathered_objects(losses)
    ema_full_err = max(
        float((pipe.ema.state_dict()[n] - reference[n]).abs().max()) for n in reference
    )
    # local_shard: rebuild each full shadow from the shards (the parameters' own layout).
    local_err = 0.0
    for n, p in student.named_parameters():
        shadow = local_ema.state_dict()[n]
        if hasattr(p, "full_tensor"):
            from torch.distributed.tensor import DTensor

            shadow = DTensor.from_local(
                shadow, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            ).full_tensor()
        local_err = max(local_err, float((shadow - reference[n]).abs().max()))
    moved = max(float((weights[n] - initial[n]).abs().max()) for n in weights)
    if rank == 0:
        print(
            json.dumps(
                {
                    "wrap": args.wrap,
                    "world": world,
                    "checksums": checksums,
                    "calls": call_counts,
                    "losses": all_losses,
                    "ema_full_tensor_max_err": ema_full_err,
                    "ema_local_shard_max_err": local_err,
                    "max_weight_change": moved,
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()
    # The results are out. Skip interpreter teardown: torch's background threads (compile
    # workers) occasionally abort it on this box ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
