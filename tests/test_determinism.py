"""deterministic_kernels: what inductor compiles under it, and the setting it restores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen.train import deterministic_kernels


def test_restores_the_callers_setting():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        with deterministic_kernels(False):  # a no-op: the outer setting stays
            assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # a caller's own strict setting is kept
    try:
        with deterministic_kernels():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_compiled_embedding_backward_adds_without_atomics_only_under_it():
    # An embedding's backward is an accumulating index_put: inductor's default lowering adds
    # with atomics from parallel threads (an order that varies between calls); under
    # deterministic kernels it runs ATen's kernel, bitwise eager's.
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    emb = nn.Embedding(11, 8)
    index, weight = torch.randint(0, 11, (64,)), torch.randn(64, 8)

    def loss(index):
        return (emb(index) * weight).sum()

    loss(index).backward()
    eager = emb.weight.grad

    def compiled(enabled: bool) -> tuple[torch.Tensor, str]:
        torch._dynamo.reset()
        emb.weight.grad = None
        # no cache hit: the code is generated (and so captured) in this process, both times
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False), \
                deterministic_kernels(enabled):  # fmt: skip
            step = torch.compile(loss, fullgraph=True)
            _, code = run_and_get_code(lambda: step(index).backward())
        return emb.weight.grad, "\n".join(code)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread compiles a serial loop: no atomics to see
    try:
        _, code = compiled(False)
        assert "atomic_add" in code
        grad, code = compiled(True)
    finally:
        torch.set_num_threads(threads)
    assert "atomic_add" not in code
    assert torch.equal(grad, eager)
