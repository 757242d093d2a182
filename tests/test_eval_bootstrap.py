"""fastgen.eval.paired_bootstrap: coverage of a known difference, pairing, reproducibility."""

from __future__ import annotations

import pytest
import torch

from fastgen.eval import paired_bootstrap


def test_interval_covers_the_true_difference_and_pairing_narrows_it():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(400, generator=g) * 10.0  # what both models share (the prompt)
    a = shared + 0.5 + 0.1 * torch.randn(400, generator=g)
    b = shared + 0.1 * torch.randn(400, generator=g)
    r = paired_bootstrap(a, b, generator=torch.Generator().manual_seed(1))
    assert r["low"] < 0.5 < r["high"] and r["n"] == 400 and r["level"] == 0.95
    torch.testing.assert_close(torch.tensor(r["mean"]), (a - b).double().mean().float())
    # Unpaired, the shared spread (std 10) would make the interval ~100x wider.
    assert r["high"] - r["low"] < 0.1


def test_same_generator_same_interval():
    a, b = torch.rand(50), torch.rand(50)
    r1 = paired_bootstrap(a, b, generator=torch.Generator().manual_seed(5))
    r2 = paired_bootstrap(a, b, generator=torch.Generator().manual_seed(5))
    assert r1 == r2 and r1["low"] <= r1["mean"] <= r1["high"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"a": torch.rand(3), "b": torch.rand(4)}, "one length"),
        ({"a": torch.rand(1), "b": torch.rand(1)}, "at least 2 pairs"),
        ({"a": torch.rand(3), "b": torch.rand(3), "level": 1.0}, "level"),
        ({"a": torch.rand(3), "b": torch.rand(3), "samples": 0}, "samples"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(**kwargs)
