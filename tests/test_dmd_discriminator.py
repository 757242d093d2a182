"""Discriminator: the heads' structure, GroupNorm groups, layouts, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from fastgen import Discriminator
from fastgen.dmd.discriminator import group_count


@pytest.mark.parametrize("channels", [1, 3, 4, 6, 8, 20, 48, 96, 128, 129, 132, 256, 1000])
def test_group_count_is_the_largest_divisor_with_four_channels_per_group(channels):
    fits = [g for g in range(1, 33) if channels % g == 0 and channels // g >= 4]
    assert group_count(channels) == (max(fits) if fits else 1)
    assert group_count(channels, max_groups=2) == max(
        [g for g in (1, 2) if channels % g == 0 and channels // g >= 4], default=1
    )


def test_group_count_rejects_no_channels():
    with pytest.raises(ValueError, match=r"^channels must be >= 1, got 0$"):
        group_count(0)


def test_spatial_heads_have_the_documented_layers():
    disc = Discriminator([8, 40], hidden=24)
    assert len(disc.heads) == 2
    for head, channels in zip(disc.heads, (8, 40)):
        kinds = [type(m) for m in head]
        assert kinds == [
            nn.Conv2d,
            nn.GroupNorm,
            nn.SiLU,
            nn.Conv2d,
            nn.GroupNorm,
            nn.SiLU,
            nn.Conv2d,
        ]
        conv1, norm1, _, conv2, norm2, _, out = head
        assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.padding) == (
            channels, 24, (3, 3), (1, 1),
        )  # fmt: skip
        assert (conv2.kernel_size, conv2.stride, conv2.padding) == ((4, 4), (2, 2), (1, 1))
        assert (out.out_channels, out.kernel_size) == (1, (1, 1))
        assert norm1.num_groups == norm2.num_groups == group_count(24) == 6
    out = disc([torch.randn(3, 8, 8, 8), torch.randn(3, 40, 4, 4)])
    assert out.shape == (3, 2)
    # each logit is its head's output averaged over space
    want = disc.heads[1](torch.ones(3, 40, 4, 4)).mean(dim=(2, 3))
    assert torch.equal(disc([torch.ones(3, 8, 8, 8), torch.ones(3, 40, 4, 4)])[:, 1:], want)


def test_token_heads_without_a_grid_are_mlps_averaged_over_tokens():
    disc = Discriminator([16], layout="tokens", hidden=8)
    head = disc.heads[0]
    assert [type(m) for m in head] == [nn.LayerNorm, nn.Linear, nn.SiLU, nn.Linear]
    assert (head[1].in_features, head[1].out_features, head[3].out_features) == (16, 8, 1)
    x = torch.randn(2, 5, 16)
    assert torch.equal(disc([x]), head(x).mean(dim=1))


def test_tokens_with_a_grid_are_the_spatial_heads_on_the_patch_grid():
    torch.manual_seed(0)
    tokens = Discriminator([16], layout="tokens", grid=(2, 3), hidden=8)
    torch.manual_seed(0)
    spatial = Discriminator([16], hidden=8)
    x = torch.randn(4, 6, 16)
    image = rearrange(x, "b (h w) c -> b c h w", h=2, w=3)
    assert tokens.grid == (2, 3)
    assert torch.equal(tokens([x]), spatial([image]))


def test_heads_run_in_their_weights_dtype():
    disc = Discriminator([8], hidden=8)
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    assert torch.equal(disc([x]), disc([x.float()]))
    tokens = Discriminator([8], layout="tokens", hidden=8)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    assert torch.equal(tokens([x]), tokens([x.float()]))


def test_defaults_the_smallest_grid_and_a_token_count_off_the_grid():
    assert Discriminator([8]).heads[0][0].out_channels == 128  # hidden width
    disc = Discriminator([8], layout="tokens", grid=(2, 2), hidden=8)
    assert disc([torch.randn(2, 4, 8)]).shape == (2, 1)
    with pytest.raises(ValueError, match=r"^grid=\(2, 2\) takes 4 tokens, got shape \(2, 6, 8\)$"):
        disc([torch.randn(2, 6, 8)])


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((8,), {}, "channels must list one channel count per tap, got 8"),
        (([],), {}, r"channels must list one channel count per tap, got \[\]"),
        (([8],), {"layout": "image"}, "layout must be 'spatial' or 'tokens', got 'image'"),
        (([8],), {"grid": (2, 2)}, r"grid=\(h, w\) goes with layout='tokens', got grid=\(2, 2\)"),
        (
            ([8],),
            {"layout": "tokens", "grid": (2,)},
            r"^grid must be \(h, w\) with h, w >= 2, got grid=\(2,\)$",
        ),
        (
            ([8],),
            {"layout": "tokens", "grid": (1, 4)},
            r"^grid must be \(h, w\) with h, w >= 2, got grid=\(1, 4\)$",
        ),
    ],
)
def test_bad_arguments_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Discriminator(*args, **kwargs)


def test_bad_features_are_named():
    disc = Discriminator([8, 8], layout="tokens", hidden=8)
    with pytest.raises(ValueError, match=r"^got 1 features for 2 heads$"):
        disc([torch.randn(2, 3, 8)])
    with pytest.raises(ValueError, match=r"layout='tokens' takes 3-D features, got shape \(2, 8\)"):
        disc([torch.randn(2, 3, 8), torch.randn(2, 8)])
    spatial = Discriminator([8], hidden=8)
    with pytest.raises(
        ValueError, match=r"layout='spatial' takes 4-D features, got shape \(2, 3, 8\)"
    ):
        spatial([torch.randn(2, 3, 8)])
