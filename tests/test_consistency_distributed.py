"""The consistency losses on wrapped students (one-rank process group): DDP and FSDP2 modules run
through the JVP, forward mode and finite differences, and give the unwrapped student's loss and
gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import ToyDiT, toy_batch

from fastgen.consistency import MeanFlowConfig, MeanFlowPipeline, SCMConfig, SCMPipeline


def wrap(net, how):
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(net, mesh=init_device_mesh("cpu", (1,)))


def losses(pipe_of, student):
    torch.manual_seed(7)
    lat, noise, cond, neg = toy_batch(5)
    pipe = pipe_of(student)
    out = pipe.compute_loss(lat, noise, cond, negative_encoder_hidden_states=neg)["total"]
    out.backward()
    params = student.module.parameters() if hasattr(student, "module") else student.parameters()
    grads = []
    for p in params:
        g = p.grad
        grads.append(g.full_tensor() if hasattr(g, "full_tensor") else g)
    return out.detach(), grads


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
@pytest.mark.parametrize("method", ["forward", "finite_difference"])
@pytest.mark.parametrize("family", ["meanflow", "scm"])
def test_wrapped_student_gives_the_plain_loss_and_gradients(one_rank_group, how, method, family):
    torch.manual_seed(0)
    if family == "meanflow":
        base = ToyDiT(r_embedding=True)
        cfg = MeanFlowConfig(jvp=method)

        def pipe_of(student):
            return MeanFlowPipeline(student, cfg)
    else:
        base = ToyDiT()
        teacher = ToyDiT()
        cfg = SCMConfig(jvp=method, guidance_scale=2.0)

        def pipe_of(student):
            return SCMPipeline(student, cfg, teacher=teacher)

    plain_loss, plain_grads = losses(pipe_of, copy.deepcopy(base))
    loss, grads = losses(pipe_of, wrap(copy.deepcopy(base), how))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, plain_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
