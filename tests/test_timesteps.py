"""Timestep sampling against analytic truncated CDFs, bounds per dtype, configs and builders."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
from conftest import DTYPES, correctly_rounded
from scipy import stats

from fastgen import (
    SampleTimestepConfig,
    make_t_list,
    resolution_shift,
    sample_from_t_list,
    sample_timesteps,
)
from fastgen.timesteps import truncated_cdf

N = 100_000
CONTINUOUS = ["uniform", "logitnormal", "lognormal", "shifted", "mode", "cosmap"]


def base_cdf(t: np.ndarray, cfg: SampleTimestepConfig) -> np.ndarray:
    """CDF of the untruncated law, derived independently of the library (scipy, bisection)."""
    kind = cfg.time_dist_type
    t = np.asarray(t, dtype=np.float64)
    if kind == "uniform":
        return t
    if kind == "logitnormal":
        with np.errstate(divide="ignore"):
            return stats.norm.cdf(np.log(t) - np.log1p(-t), cfg.train_p_mean, cfg.train_p_std)
    if kind == "lognormal":
        with np.errstate(divide="ignore"):
            return stats.norm.cdf(np.log(t), cfg.train_p_mean, cfg.train_p_std)
    if kind == "shifted":  # the map as written, inverted numerically
        s = cfg.shift
        return _invert(lambda u: s * u / (1 + (s - 1) * u), t)
    if kind == "cosmap":  # SD3's map as written, inverted numerically
        return _invert(lambda u: 1 - 1 / (np.tan(np.pi * u / 2) + 1), t)
    if kind == "mode":  # SD3 as written: t decreasing in u, so F(t) = 1 - u*(t)
        s = cfg.mode_scale
        return 1 - _invert(lambda u: 1 - u - s * (np.cos(np.pi * u / 2) ** 2 - 1 + u), t, False)
    raise AssertionError(kind)


def _invert(forward, t, increasing=True):
    """u in [0, 1] with forward(u) = t for a monotone map on [0, 1]: bisection, 64 halvings
    (past float64's resolution), every point at once."""
    t = np.asarray(t, dtype=np.float64)
    lo, hi = np.zeros_like(t), np.ones_like(t)
    for _ in range(64):
        mid = (lo + hi) / 2
        with np.errstate(divide="ignore", over="ignore"):
            value = forward(mid)
        short = value < t if increasing else value > t
        lo, hi = np.where(short, mid, lo), np.where(short, hi, mid)
    return (lo + hi) / 2


def truncated(cfg: SampleTimestepConfig):
    lo, hi = base_cdf(cfg.min_t, cfg), base_cdf(cfg.max_t, cfg)
    return lambda t: (base_cdf(np.clip(t, cfg.min_t, cfg.max_t), cfg) - lo) / (hi - lo)


CONFIGS = [
    SampleTimestepConfig(time_dist_type="uniform"),
    SampleTimestepConfig(time_dist_type="logitnormal", train_p_mean=-0.4, train_p_std=1.2),
    SampleTimestepConfig(time_dist_type="logitnormal", min_t=0.0, max_t=1.0),
    SampleTimestepConfig(time_dist_type="lognormal", train_p_mean=-1.0, train_p_std=0.8),
    SampleTimestepConfig(time_dist_type="shifted", shift=5.0),
    SampleTimestepConfig(time_dist_type="shifted", shift=0.3, min_t=0.2, max_t=0.7),
    SampleTimestepConfig(time_dist_type="mode", mode_scale=1.29),
    SampleTimestepConfig(time_dist_type="mode", mode_scale=-0.5),
    SampleTimestepConfig(time_dist_type="cosmap"),
    # asymmetric bounds for every family: a reflected map cannot hide behind symmetry
    *[
        SampleTimestepConfig(time_dist_type=kind, min_t=0.2, max_t=0.7, train_p_mean=-0.3)
        for kind in ("uniform", "logitnormal", "lognormal", "shifted", "mode", "cosmap")
    ],
]


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.time_dist_type}-{c.min_t}-{c.max_t}")
def test_ks_against_analytic_truncated_cdf(cfg, stratified):
    cfg = cfg.model_copy(update={"stratified": stratified})
    t = sample_timesteps(N, cfg, device="cpu", dtype=torch.float64).numpy()
    assert t.min() >= cfg.min_t and t.max() <= cfg.max_t
    assert stats.kstest(t, truncated(cfg)).pvalue > 0.01
    # and the law really is truncated, not clamped: no atom at either bound
    assert (t == cfg.max_t).mean() < 1e-3 and (t == cfg.min_t).mean() < 1e-3


@pytest.mark.parametrize(
    "cfg", [c for c in CONFIGS if c.time_dist_type != "uniform"], ids=lambda c: c.time_dist_type
)
def test_ks_rejects_the_untruncated_or_wrong_law(cfg):
    # Guard on the oracle: the same test tells the law from a uniform on [min_t, max_t].
    t = sample_timesteps(N, cfg, device="cpu", dtype=torch.float64).numpy()
    uniform = SampleTimestepConfig(min_t=cfg.min_t, max_t=cfg.max_t)
    assert stats.kstest(t, truncated(uniform)).pvalue < 1e-6


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.time_dist_type)
def test_library_cdf_and_quantile_match_oracle(cfg):
    grid = np.linspace(cfg.min_t, cfg.max_t, 17)
    ours = np.array([truncated_cdf(float(x), cfg) for x in grid])
    np.testing.assert_allclose(ours, truncated(cfg)(grid), rtol=0, atol=1e-9)
    # the forward map the sampler uses: G(u) lands where the oracle's CDF says u
    from fastgen.timesteps import _quantile

    u = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    t = _quantile(u, cfg).numpy()
    np.testing.assert_allclose(base_cdf(t, cfg), u.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("stratified", [False, True])
def test_polynomial_is_uniform_on_the_grid(stratified):
    cfg = SampleTimestepConfig(
        time_dist_type="polynomial", min_t=0.01, max_t=0.9, stratified=stratified
    )
    t = sample_timesteps(N, cfg, device="cpu", dtype=torch.float64)
    grid = torch.linspace(0.01, 0.9, 1000, dtype=torch.float64)
    index = torch.round((t - 0.01) / (0.89 / 999)).long()
    torch.testing.assert_close(t, grid[index], rtol=0, atol=1e-12)
    counts = torch.bincount(index, minlength=1000).numpy()
    assert stats.chisquare(counts).pvalue > 0.01


@pytest.mark.parametrize("policy", ["float64", "float32"])
def test_polynomial_grid_ends_at_the_bounds(monkeypatch, policy):
    """The last stratum's draw can round to u = 1 in float32: it must still be the last grid
    point, max_t (and u = 0 the first, min_t), for bounds where min + step * 999 misses max_t."""
    from fastgen import use_precision

    lo, hi = (float(torch.tensor(b)) for b in (0.02, 0.95))  # float32 values
    assert float(torch.tensor(lo) + torch.tensor((hi - lo) / 999) * 999) != hi
    cfg = SampleTimestepConfig(time_dist_type="polynomial", min_t=lo, max_t=hi, stratified=True)
    draws = {"rand": torch.tensor([0.0, 1.0 - 2.0**-24]), "randperm": torch.tensor([0, 1])}
    monkeypatch.setattr(torch, "rand", lambda n, **kw: draws["rand"].to(kw["dtype"]))
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: draws["randperm"])
    with use_precision(policy):
        t = sample_timesteps(2, cfg, device="cpu", dtype=torch.float32)
    assert t.tolist() == [lo, hi]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [*CONTINUOUS, "polynomial"])
def test_samples_stay_inside_bounds_after_rounding(kind, dtype):
    cfg = SampleTimestepConfig(time_dist_type=kind, shift=20.0)
    t = sample_timesteps(N, cfg, device="cpu", dtype=dtype)
    assert t.dtype == dtype and t.shape == (N,)
    wide = t.to(torch.float64)
    assert bool((wide >= cfg.min_t).all()) and bool((wide <= cfg.max_t).all())


def test_bf16_upper_bound_is_the_largest_value_inside():
    # 0.999 rounds to 1.0 in bf16; the sampler must give the bf16 value just below instead.
    cfg = SampleTimestepConfig(time_dist_type="shifted", shift=50.0)
    t = sample_timesteps(N, cfg, device="cpu", dtype=torch.bfloat16)
    assert torch.tensor(0.999).to(torch.bfloat16) == 1.0
    assert t.max() < 1.0 and (t == 0.99609375).any()


def test_stratified_has_one_sample_per_stratum():
    cfg = SampleTimestepConfig(min_t=0.0, max_t=1.0, stratified=True)
    t = sample_timesteps(64, cfg, device="cpu", dtype=torch.float64)
    assert torch.equal(
        torch.sort(torch.floor(t * 64)).values, torch.arange(64, dtype=torch.float64)
    )
    assert not torch.equal(torch.floor(t * 64), torch.arange(64, dtype=torch.float64))  # shuffled


@pytest.mark.parametrize("kind", ["uniform", "logitnormal", "shifted"])
def test_stratified_batches_have_lower_variance(kind):
    def batch_means(stratified):
        cfg = SampleTimestepConfig(time_dist_type=kind, stratified=stratified)
        return torch.stack([sample_timesteps(16, cfg, device="cpu").mean() for _ in range(2000)])

    assert batch_means(True).var() < 0.25 * batch_means(False).var()


def test_reproducible_by_seed_and_generator():
    cfg = SampleTimestepConfig(time_dist_type="logitnormal", stratified=True)
    torch.manual_seed(3)
    a = sample_timesteps(100, cfg, device="cpu")
    torch.manual_seed(3)
    assert torch.equal(a, sample_timesteps(100, cfg, device="cpu"))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b = sample_timesteps(100, cfg, device="cpu", generator=g1)
    assert torch.equal(b, sample_timesteps(100, cfg, device="cpu", generator=g2))
    assert not torch.equal(a, b)
    t1, k1 = sample_from_t_list(50, [0.9, 0.5, 0.0], device="cpu", generator=g1, return_index=True)
    t2, k2 = sample_from_t_list(50, [0.9, 0.5, 0.0], device="cpu", generator=g2, return_index=True)
    assert torch.equal(t1, t2) and torch.equal(k1, k2)


@pytest.mark.parametrize("kind", [*CONTINUOUS, "polynomial"])
def test_generator_path_of_every_option(kind):
    cfg = SampleTimestepConfig(time_dist_type=kind, min_t=0.2, max_t=0.7, stratified=True)
    t = sample_timesteps(
        64, cfg, device="cpu", dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    again = sample_timesteps(
        64, cfg, device="cpu", dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(t, again) and bool((t >= 0.2).all() and (t <= 0.7).all())
    if kind == "uniform":  # one draw per stratum, in shuffled order
        strata = torch.floor((t - 0.2) / 0.5 * 64)
        assert torch.equal(torch.sort(strata).values, torch.arange(64, dtype=torch.float64))
        assert not torch.equal(strata, torch.arange(64, dtype=torch.float64))


def test_zero_samples():
    assert sample_timesteps(0, SampleTimestepConfig(), device="cpu").shape == (0,)


# --- sample_from_t_list ----------------------------------------------------------------------


@pytest.mark.parametrize("seeded", [False, True], ids=["global", "generator"])
def test_sample_from_t_list_is_uniform_over_rungs_without_the_final_zero(seeded):
    ladder = make_t_list(4, shift=5.0)
    gen = torch.Generator().manual_seed(8) if seeded else None
    t, k = sample_from_t_list(
        N, ladder, device="cpu", dtype=torch.float64, return_index=True, generator=gen
    )
    assert not bool((t == 0).any())
    assert torch.equal(t, torch.tensor(ladder, dtype=torch.float64)[k])
    assert set(k.tolist()) == {0, 1, 2, 3}
    counts = torch.bincount(k, minlength=4).numpy()
    assert stats.chisquare(counts).pvalue > 0.01
    assert k.dtype == torch.int64


def test_sample_from_t_list_makes_its_samples_on_the_requested_device():
    t, k = sample_from_t_list(6, [0.9, 0.5, 0.0], device=torch.device("meta"), return_index=True)
    assert t.device.type == "meta" and k.device.type == "meta" and t.shape == (6,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_from_t_list_rounds_each_rung_once(dtype):
    ladder = [0.9, 0.3, 0.1, 0.0]
    t = sample_from_t_list(1000, ladder, device="cpu", dtype=dtype)
    allowed = correctly_rounded(torch.tensor(ladder[:-1], dtype=torch.float64), dtype)
    assert t.dtype == dtype and bool(torch.isin(t, allowed).all())
    assert len(torch.unique(t)) == 3


BAD_T_LISTS = [
    ([0.5], "at least 2 entries"),
    ([0.5, 0.6, 0.0], "strictly decreasing"),
    ([0.5, 0.5, 0.0], "strictly decreasing"),
    ([1.5, 0.0], "outside \\[0, 1\\]"),
    ([0.9, float("nan"), 0.0], "outside \\[0, 1\\]"),
    ([0.9, 0.1], "end with exactly 0"),
    ("0.9", "must be a list"),
    ([0.9, "a", 0.0], "must be a float"),
]


@pytest.mark.parametrize(("ladder", "words"), BAD_T_LISTS)
def test_bad_t_list(ladder, words):
    with pytest.raises(ValueError, match=f"t_list.*{words}"):
        sample_from_t_list(4, ladder, device="cpu")
    with pytest.raises(pydantic.ValidationError, match=words):
        SampleTimestepConfig(t_list=ladder)


BAD_ARGS = [
    (
        lambda: sample_timesteps(-1, SampleTimestepConfig(), device="cpu"),
        ValueError,
        "n must be >= 0",
    ),
    (
        lambda: sample_timesteps(2.0, SampleTimestepConfig(), device="cpu"),
        TypeError,
        "n must be an int, got float",
    ),
    (
        lambda: sample_timesteps(2, {"time_dist_type": "uniform"}, device="cpu"),
        TypeError,
        "cfg must be a SampleTimestepConfig",
    ),
    (
        lambda: sample_timesteps(2, SampleTimestepConfig(), device="cpu", dtype=torch.int64),
        TypeError,
        "dtype must be a floating-point",
    ),
    (lambda: sample_from_t_list(-2, [0.5, 0.0], device="cpu"), ValueError, "n must be >= 0"),
    (lambda: sample_from_t_list(2, [0.5, 0.0], device="cpu", dtype=torch.bool), TypeError, "dtype"),
]


@pytest.mark.parametrize(("call", "error", "words"), BAD_ARGS, ids=[b[2] for b in BAD_ARGS])
def test_bad_sampling_arguments(call, error, words):
    with pytest.raises(error, match=words):
        call()


# --- config ----------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"time_dist_type": "beta"}, "time_dist_type"),
    ({"train_p_std": 0.0}, "train_p_std"),
    ({"train_p_mean": float("nan")}, "train_p_mean"),
    ({"train_p_mean": float("inf")}, "train_p_mean"),
    ({"shift": -1.0}, "shift"),
    ({"shift": 0.0}, "shift"),  # the bound itself
    ({"mode_scale": 1.8}, "mode_scale"),
    ({"mode_scale": 1.7520}, "mode_scale"),  # just past 1 / (pi/2 - 1) = 1.75194...
    ({"mode_scale": -1.0}, "mode_scale"),
    ({"min_t": -0.1}, "min_t"),
    ({"min_t": -1e-12}, "min_t"),
    ({"max_t": 1.1}, "max_t"),
    ({"max_t": 1.0 + 1e-12}, "max_t"),
    ({"min_t": 0.5, "max_t": 0.5}, "min_t"),
    ({"min_t": 0.7, "max_t": 0.2}, "min_t"),
    ({"log_t_df": 0.01}, "log_t_df is FastGen's EDM-only"),
    ({"sigma_max": 80.0}, "sigma_max"),
    ({"t_list": [0.9, 0.0, 0.5]}, "t_list"),
]


@pytest.mark.parametrize(("kwargs", "words"), BAD_CONFIGS, ids=[b[1] for b in BAD_CONFIGS])
def test_config_validation(kwargs, words):
    with pytest.raises(pydantic.ValidationError, match=words):
        SampleTimestepConfig(**kwargs)


def test_config_bounds_accept_their_edges():
    assert SampleTimestepConfig(shift=1e-9).shift == 1e-9
    assert SampleTimestepConfig(time_dist_type="mode", mode_scale=1.7519).mode_scale == 1.7519
    assert SampleTimestepConfig(min_t=0.0, max_t=1.0).max_t == 1.0
    assert SampleTimestepConfig(train_p_std=1e-12).train_p_std == 1e-12


def test_config_defaults_frozen_and_json_round_trip():
    cfg = SampleTimestepConfig()
    assert (cfg.time_dist_type, cfg.train_p_mean, cfg.train_p_std, cfg.shift) == (
        "uniform",
        0.0,
        1.0,
        5.0,
    )
    assert (cfg.mode_scale, cfg.min_t, cfg.max_t, cfg.t_list, cfg.stratified) == (
        1.29,
        0.001,
        0.999,
        None,
        False,
    )
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.shift = 3.0
    full = SampleTimestepConfig(time_dist_type="mode", t_list=[0.999, 0.5, 0.0], stratified=True)
    assert SampleTimestepConfig.model_validate_json(full.model_dump_json()) == full
    assert full.t_list == (0.999, 0.5, 0.0)
    assert SampleTimestepConfig.model_fields["shift"].description  # per-field docstrings


# --- builders --------------------------------------------------------------------------------


def test_make_t_list_reproduces_fastgen_student_list():
    ladder = make_t_list(4, shift=5.0)
    assert ladder[0] == 0.999 and ladder[-1] == 0.0
    np.testing.assert_allclose(ladder, [0.999, 0.9375, 5 / 6, 0.625, 0.0], rtol=0, atol=1e-15)
    assert make_t_list(1) == [0.999, 0.0]
    np.testing.assert_allclose(make_t_list(4, max_t=1.0), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2, "shift": 0.0}, "shift"),
        ({"num_steps": 2, "max_t": 0.0}, "max_t"),
    ],
)
def test_make_t_list_rejects(kwargs, words):
    with pytest.raises(ValueError, match=words):
        make_t_list(**kwargs)


def test_resolution_shift_matches_flux_defaults():
    assert resolution_shift(256) == pytest.approx(math.exp(0.5), rel=1e-15)
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15), rel=1e-15)
    assert resolution_shift(1024) == pytest.approx(math.exp(0.5 + 768 * 0.65 / 3840), rel=1e-15)
    # the library's shift map with s = exp(mu) is Flux's time_shift(mu, 1, t)
    from fastgen.timesteps import _shift_map

    mu = math.log(resolution_shift(2048))
    for t in (0.05, 0.3, 0.9):
        flux = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        assert _shift_map(t, resolution_shift(2048)) == pytest.approx(flux, rel=1e-14)
    with pytest.raises(ValueError, match="seq_len"):
        resolution_shift(-1)
    assert resolution_shift(0) > 0


def test_resolution_shift_says_which_anchors_coincide():
    with pytest.raises(ValueError, match=r"^max_seq_len must differ from base_seq_len$"):
        resolution_shift(1024, base_seq_len=512, max_seq_len=512)


@pytest.mark.parametrize("stratified", [False, True], ids=["iid", "stratified"])
def test_samples_are_made_on_the_requested_device(stratified):
    # the meta device needs no data: a sample made anywhere else would not be on it
    cfg = SampleTimestepConfig(time_dist_type="logitnormal", stratified=stratified)
    t = sample_timesteps(7, cfg, device=torch.device("meta"))
    assert t.device.type == "meta" and t.shape == (7,) and t.dtype == torch.float32


@pytest.mark.parametrize("stratified", [False, True], ids=["iid", "stratified"])
@pytest.mark.parametrize("seeded", [False, True], ids=["global", "generator"])
def test_float64_samples_carry_float64_uniforms(stratified, seeded):
    cfg = SampleTimestepConfig(min_t=0.0, max_t=1.0, stratified=stratified)
    gen = torch.Generator().manual_seed(3) if seeded else None
    t = sample_timesteps(1000, cfg, device="cpu", dtype=torch.float64, generator=gen)
    # uniforms drawn in float32 would all be float32 values
    assert not torch.equal(t.float().double(), t)


def test_lognormal_support_may_start_at_zero():
    cfg = SampleTimestepConfig(time_dist_type="lognormal", min_t=0.0, max_t=1.0)
    assert truncated_cdf(0.0, cfg) == 0.0 and truncated_cdf(1.0, cfg) == 1.0
    mid = float(base_cdf(0.3, cfg) / base_cdf(1.0, cfg))  # base_cdf(0) = 0
    assert truncated_cdf(0.3, cfg) == pytest.approx(mid, rel=1e-12)
    t = sample_timesteps(4096, cfg, device="cpu", dtype=torch.float64)
    assert bool(((t >= 0.0) & (t <= 1.0)).all())


def test_no_device_means_the_cpu_and_a_bad_cfg_is_named():
    t = sample_timesteps(5, SampleTimestepConfig(), device=None, dtype=torch.float64)
    assert t.device.type == "cpu" and t.dtype == torch.float64
    with pytest.raises(TypeError, match=r"^cfg must be a SampleTimestepConfig, got dict$"):
        sample_timesteps(5, {"min_t": 0.1}, device=None)


@pytest.mark.parametrize("steps", [True, 2.0, 0])
def test_make_t_list_wants_a_positive_int(steps):
    with pytest.raises((TypeError, ValueError), match="num_steps"):
        make_t_list(steps)
