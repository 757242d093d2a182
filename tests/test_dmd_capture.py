"""Feature capture: features come back from the call that made them, never stale, and compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from toys import ToyDiT

from fastgen import attach_feature_capture
from fastgen.dmd.capture import feature_capture_of


def test_features_are_those_of_this_call_and_nothing_is_kept_between_calls():
    net = ToyDiT()
    capture = attach_feature_capture(net, [1, 0], blocks="transformer_blocks")
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    seen = []
    hook = net.transformer_blocks[1].register_forward_hook(lambda m, a, o: seen.append(o))
    _, feats_a = capture.run(lambda: net(hidden_states=x, timestep=t))
    net(hidden_states=2 * x, timestep=t)  # a call outside run(): captured nowhere
    _, feats_b = capture.run(lambda: net(hidden_states=x, timestep=t))
    hook.remove()
    assert torch.equal(feats_a[0], seen[0]) and torch.equal(feats_b[0], seen[2])
    assert feats_a is not feats_b and capture._sink is None


def test_missing_capture_and_misuse_are_clear_errors():
    net = ToyDiT(depth=2)
    capture = attach_feature_capture(net, ["transformer_blocks.1"])
    with pytest.raises(RuntimeError, match="did not run"):
        capture.run(lambda: net.proj_out(torch.randn(2, 32)))  # the tapped block never runs
    with pytest.raises(ValueError, match="not a submodule"):
        attach_feature_capture(net, ["transformer_blocks.7"])
    with pytest.raises(ValueError, match="blocks="):
        attach_feature_capture(net, [0])
    with pytest.raises(RuntimeError, match="nest"):
        capture.run(lambda: capture.run(lambda: None))
    tuple_net = nn.Sequential(nn.Linear(2, 2))
    tuple_net[0].register_forward_hook(lambda m, a, o: (o, o))
    capture = attach_feature_capture(tuple_net, ["0"])
    with pytest.raises(TypeError, match="output_index"):
        capture.run(lambda: tuple_net(torch.randn(1, 2)))
    capture = attach_feature_capture(tuple_net, ["0"], output_index=1)  # replaces the old hooks
    _, (feat,) = capture.run(lambda: tuple_net(torch.randn(1, 2)))
    assert feat.shape == (1, 2)


def test_capture_compiles_in_one_graph_with_grad_to_the_input():
    net = ToyDiT()
    capture = attach_feature_capture(net, [0, 1], blocks="transformer_blocks")

    def fn(x, t):
        out, feats = capture.run(lambda: net(hidden_states=x, timestep=t).sample)
        return out.sum() + sum(f.square().mean() for f in feats)

    counter = CompileCounter()
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    torch.compile(fn, backend=counter, fullgraph=True)(x, torch.rand(3)).backward()
    assert counter.frame_count == 1 and x.grad.abs().sum() > 0
    expected = torch.autograd.grad(fn(x, torch.full((3,), 0.5)), x)[0]
    x.grad = None
    torch.compile(fn, backend="aot_eager", fullgraph=True)(x, torch.full((3,), 0.5)).backward()
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize(
    ("taps", "error", "message"),
    [
        ("transformer_blocks.0", ValueError, r"^taps must be a non-empty list of block names or indices, got 'transformer_blocks.0'$"),
        ([], ValueError, r"^taps must be a non-empty list of block names or indices, got \[\]$"),
        ([True], TypeError, r"^each tap must be a module name or an int index, got True$"),
        ([1.0], TypeError, r"^each tap must be a module name or an int index, got 1.0$"),
    ],
)  # fmt: skip
def test_bad_taps_are_named(taps, error, message):
    with pytest.raises(error, match=message):
        attach_feature_capture(ToyDiT(), taps, blocks="transformer_blocks")


def test_other_misuse_messages_in_full():
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, got int$"):
        attach_feature_capture(3, ["0"])
    net = nn.Sequential(nn.Linear(2, 2))
    net[0].register_forward_hook(lambda m, a, o: (o, o))
    capture = attach_feature_capture(net, ["0"])
    with pytest.raises(
        TypeError,
        match=r"^tapped block '0' returned tuple; set output_index to pick the tensor out of its output$",
    ):
        capture.run(lambda: net(torch.randn(1, 2)))
    with pytest.raises(
        RuntimeError, match=r"^FeatureCapture.run is already running: calls cannot nest$"
    ):
        capture.run(lambda: capture.run(lambda: None))


def test_attaching_again_replaces_the_hooks():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    attach_feature_capture(net, ["0"])
    attach_feature_capture(net, ["1"])
    assert len(net[0]._forward_hooks) == 0 and len(net[1]._forward_hooks) == 1


def test_the_capture_is_found_through_wrappers():
    net = nn.Sequential(nn.Linear(2, 2))
    capture = attach_feature_capture(net, ["0"])

    class Wrapper(nn.Module):  # DDP's layout: the network in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert feature_capture_of(net) is capture
    assert feature_capture_of(Wrapper(net)) is capture
    assert feature_capture_of(torch.compile(net)) is capture  # ._orig_mod
    assert feature_capture_of(nn.Sequential(nn.Linear(2, 2))) is None
