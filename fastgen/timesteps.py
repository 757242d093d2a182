r"""Timestep sampling for RF training, exact and free of host syncs.

Every continuous distribution is written as a quantile function :math:`G` (increasing,
:math:`[0, 1] \to [0, 1]`) applied to a uniform draw. Truncating to ``[min_t, max_t]`` is then
exact and costs nothing: the uniform is drawn on :math:`[G^{-1}(\text{min\_t}),
G^{-1}(\text{max\_t})]`, whose two ends are computed once per call in Python (constants under
``torch.compile``). No rejection loop, no ``.item()``, and the support is exactly the
interval. FastGen instead squeezes logit-normal samples affinely and clamps shifted samples
(which puts an atom at ``max_t``); fastgen's samples follow the truncated law exactly.

.. math::

    t = G\big(a + (b - a)\, u\big), \quad u \sim U(0, 1), \quad a = G^{-1}(\text{min\_t}),\ b = G^{-1}(\text{max\_t})
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastgen._rounding import round_once, round_scalar
from fastgen.config import SampleTimestepConfig, check_t_list
from fastgen.precision import compute_dtype

__all__ = ["make_t_list", "resolution_shift", "rungs_at", "sample_from_t_list", "sample_timesteps"]

# Size of the ``polynomial`` grid (FastGen's RF reading: linspace(min_t, max_t, 1000)).
POLYNOMIAL_GRID = 1000


def _shift_map(u, shift: float):
    """The resolution shift t = s u / (1 + (s - 1) u); works on floats and tensors."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _mode_quantile(u, scale: float, sin):
    # SD3's map t = 1 - w - s (cos^2(pi w / 2) - 1 + w) is decreasing in w; with w = 1 - u it
    # becomes this increasing quantile function, and 1 - u is as uniform as u.
    return u * (1.0 + scale) - scale * sin(0.5 * math.pi * u) ** 2


def _quantile(u: Tensor, cfg: SampleTimestepConfig) -> Tensor:
    """G(u) for the continuous families, in float64."""
    kind = cfg.time_dist_type
    if kind == "uniform":
        return u
    if kind == "logitnormal":
        return torch.sigmoid(cfg.train_p_mean + cfg.train_p_std * torch.special.ndtri(u))
    if kind == "lognormal":
        return torch.exp(cfg.train_p_mean + cfg.train_p_std * torch.special.ndtri(u))
    if kind == "shifted":
        return _shift_map(u, cfg.shift)
    if kind == "mode":
        return _mode_quantile(u, cfg.mode_scale, torch.sin)
    if kind == "cosmap":
        return 1.0 - 1.0 / (torch.tan(0.5 * math.pi * u) + 1.0)
    raise AssertionError(kind)  # the config's Literal rules this out


def _inverse_quantile(t: float, cfg: SampleTimestepConfig) -> float:
    """G^{-1}(t) in Python floats, for the two ends of the truncated uniform."""
    kind = cfg.time_dist_type
    if kind == "uniform":
        return t
    if kind == "logitnormal":
        if t <= 0.0 or t >= 1.0:
            return t
        return _normal_cdf((math.log(t / (1.0 - t)) - cfg.train_p_mean) / cfg.train_p_std)
    if kind == "lognormal":
        if t <= 0.0:
            return 0.0
        return _normal_cdf((math.log(t) - cfg.train_p_mean) / cfg.train_p_std)
    if kind == "shifted":
        return t / (cfg.shift - (cfg.shift - 1.0) * t)
    if kind == "cosmap":
        return math.atan2(t, 1.0 - t) / (0.5 * math.pi)
    if kind == "mode":
        # No closed form; the map is monotone on [0, 1], so bisect to float64 resolution.
        lo, hi = 0.0, 1.0
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            if _mode_quantile(mid, cfg.mode_scale, math.sin) < t:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)
    raise AssertionError(kind)


def truncated_cdf(t: float, cfg: SampleTimestepConfig) -> float:
    """The CDF of the continuous distribution ``cfg`` describes, at ``t`` (for tests and plots).

    Args:
        t: A point in [0, 1].
        cfg: A config whose ``time_dist_type`` is not ``polynomial``.

    Returns:
        P(T <= t) under the base distribution truncated to [min_t, max_t].

    Example:
        >>> round(truncated_cdf(0.5, SampleTimestepConfig(min_t=0.0, max_t=1.0)), 12)
        0.5
    """
    a, b = _inverse_quantile(cfg.min_t, cfg), _inverse_quantile(cfg.max_t, cfg)
    u = _inverse_quantile(min(max(t, cfg.min_t), cfg.max_t), cfg)
    return min(max((u - a) / (b - a), 0.0), 1.0)


def _uniforms(
    n: int,
    stratified: bool,
    device: torch.device | str | None,
    generator: torch.Generator | None,
    wide: torch.dtype,
) -> Tensor:
    # generator=None is a separate overload that rejects symbolic sizes: only pass a real one.
    if generator is None:
        u = torch.rand(n, device=device, dtype=wide)
    else:
        u = torch.rand(n, device=device, dtype=wide, generator=generator)
    if stratified:
        # One draw per stratum [i/n, (i+1)/n), strata shuffled so no sample index is biased.
        if generator is None:
            strata = torch.randperm(n, device=device)
        else:
            strata = torch.randperm(n, device=device, generator=generator)
        u = (strata.to(wide) + u) / n
    return u


def _cast_inside(t: Tensor, lo: float, hi: float, dtype: torch.dtype) -> Tensor:
    """Round ``t`` (already in [lo, hi]) once to ``dtype`` without leaving [lo, hi].

    Nearest rounding can cross a bound (0.999 rounds to 1.0 in bf16); such a sample becomes
    the nearest representable value inside, the bound rounded inwards on the host (a
    constant under compile, no sync).
    """
    if dtype == t.dtype == torch.float64:
        return t
    inner_lo, inner_hi = round_scalar(lo, dtype, "up"), round_scalar(hi, dtype, "down")
    return round_once(t, dtype).clamp(inner_lo, inner_hi)


def _check_sampling_args(n: object, dtype: object, generator: torch.Generator | None) -> None:
    # torch.export passes a symbolic batch size (SymInt).
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    if generator is not None and torch.compiler.is_compiling():
        raise ValueError(
            "generator= cannot be used under torch.compile or torch.export (a Generator cannot "
            "enter a graph): drop it inside compiled code, or draw t outside the compiled region"
        )


def sample_timesteps(
    n: int,
    cfg: SampleTimestepConfig,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Sample ``n`` training timesteps according to ``cfg``.

    Continuous families are sampled exactly truncated to ``[cfg.min_t, cfg.max_t]`` through
    their quantile function :math:`G`:

    .. math::

        t = G\big(G^{-1}(\text{min\_t}) + (G^{-1}(\text{max\_t}) - G^{-1}(\text{min\_t}))\, u\big),
        \quad u \sim U(0, 1)

    with :math:`G(u) = \sigma(\mu + s\,\Phi^{-1}(u))` (logitnormal),
    :math:`e^{\mu + s\,\Phi^{-1}(u)}` (lognormal), :math:`\frac{k u}{1 + (k - 1) u}` (shifted,
    k = ``shift``), :math:`(1 + m) u - m \sin^2(\pi u / 2)` (SD3 ``mode``, the map
    :math:`1 - u - m(\cos^2(\pi u/2) - 1 + u)` reflected to be increasing), and
    :math:`1 - 1 / (\tan(\pi u / 2) + 1)` (SD3 ``cosmap``). ``polynomial`` is, under RF, the
    discrete uniform on ``linspace(min_t, max_t, 1000)`` (EDM's polynomial sigma spacing does
    not apply). With ``cfg.stratified`` the n uniforms are one per stratum ``[i/n, (i+1)/n)``,
    shuffled.

    Compiles with ``fullgraph=True`` when ``generator`` is None: no host sync, and the
    truncation ends are Python constants. A ``torch.Generator`` cannot enter a compiled graph,
    so the ``generator=`` path is eager only (passing one under compile raises).

    Args:
        n: Number of samples, >= 0.
        cfg: The distribution.
        device: Where the samples live.
        dtype: Output floating dtype.
        generator: Optional generator for reproducible eager draws.

    Returns:
        Tensor ``[n]`` in ``dtype``, computed in float64 (float32 under that policy) and
        rounded once, inside
        ``[min_t, max_t]`` even after rounding: a value that would round past a bound is the
        nearest representable value inside it.

    Example:
        >>> import torch
        >>> cfg = SampleTimestepConfig(time_dist_type="logitnormal", min_t=0.2, max_t=0.8)
        >>> t = sample_timesteps(1000, cfg, device="cpu")
        >>> bool(t.min() >= 0.2) and bool(t.max() <= 0.8)
        True
    """
    if not isinstance(cfg, SampleTimestepConfig):
        raise TypeError(f"cfg must be a SampleTimestepConfig, got {type(cfg).__name__}")
    _check_sampling_args(n, dtype, generator)
    wide = compute_dtype(torch.device("cpu") if device is None else torch.device(device))
    u = _uniforms(n, cfg.stratified, device, generator, wide)
    if cfg.time_dist_type == "polynomial":
        index = torch.floor(u * POLYNOMIAL_GRID).clamp_max(POLYNOMIAL_GRID - 1)
        # As a lerp, so that the grid's ends are min_t and max_t exactly in any compute dtype
        # (u can round to 1 in float32: (n - 1 + u) / n for the last stratum).
        s = index / (POLYNOMIAL_GRID - 1)
        t = cfg.min_t * (1.0 - s) + cfg.max_t * s
    else:
        lo = _inverse_quantile(cfg.min_t, cfg)
        hi = _inverse_quantile(cfg.max_t, cfg)
        t = _quantile(lo + (hi - lo) * u, cfg)
    t = t.clamp(cfg.min_t, cfg.max_t)
    return _cast_inside(t, cfg.min_t, cfg.max_t, dtype)


def sample_from_t_list(
    n: int,
    t_list: Sequence[float],
    *,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    return_index: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Sample ``n`` starting timesteps uniformly from ``t_list[:-1]``.

    Used for multi-step student training: ``t_list`` encodes the inference trajectory
    (``t_list[-1]`` must be 0), and a random rung is drawn so the student is trained at every
    step of it:

    .. math::

        k \sim U\{0, \dots, K - 2\}, \qquad t = \text{t\_list}[k]

    The rungs are Python constants selected with ``torch.where``: no tensor is built from the
    list, no host sync, CUDA-graph capturable. ``generator=`` is eager only.

    Args:
        n: Number of samples, >= 0.
        t_list: The ladder: at least 2 floats, strictly decreasing, in [0, 1], last exactly 0.
        device: Where the samples live.
        dtype: Output floating dtype.
        generator: Optional generator for reproducible eager draws.
        return_index: Also return the rung index ``k`` (int64 ``[n]``), so the next rung
            ``t_list[k + 1]`` can be looked up on device (no ``next_in_t_list`` sync).

    Returns:
        ``t`` ``[n]`` in ``dtype`` (each rung rounded once), or ``(t, k)`` with ``return_index``.

    Raises:
        ValueError: ``n < 0`` or a bad ``t_list``.
        TypeError: ``n`` not an int, or a non-floating ``dtype``.

    Example:
        >>> t, k = sample_from_t_list(6, [0.999, 0.5, 0.0], device="cpu", return_index=True)
        >>> bool(((k == 0) == (t == 0.999)).all()) and bool((t != 0).all())
        True
    """
    rungs = check_t_list(t_list)
    _check_sampling_args(n, dtype, generator)
    if generator is None:
        index = torch.randint(0, len(rungs) - 1, (n,), device=device)
    else:
        index = torch.randint(0, len(rungs) - 1, (n,), device=device, generator=generator)
    t = rungs_at(index, rungs, dtype=dtype)
    return (t, index) if return_index else t


def rungs_at(index: Tensor, t_list: Sequence[float], *, dtype: torch.dtype) -> Tensor:
    """``t_list[index]`` on ``index``'s device, each rung rounded once to ``dtype`` on the host
    (Python constants selected with ``torch.where``: no tensor built from the list, no sync).
    ``index`` must lie in ``[0, len(t_list) - 1)``; checked by the callers' construction."""
    rungs = [round_scalar(r, dtype) for r in t_list]
    t = torch.full(index.shape, rungs[0], dtype=dtype, device=index.device)
    for k in range(1, len(rungs) - 1):
        t = torch.where(index == k, rungs[k], t)
    return t


def make_t_list(num_steps: int, *, shift: float = 1.0, max_t: float = 0.999) -> list[float]:
    r"""The student's inference ladder: ``num_steps + 1`` timesteps from ``max_t`` down to 0.

    .. math::

        u_i = 1 - i / N, \qquad t_i = \min\Big(\frac{s\, u_i}{1 + (s - 1)\, u_i},\ \text{max\_t}\Big),
        \qquad t_N = 0

    Args:
        num_steps: N >= 1, the number of student steps.
        shift: s > 0, the shift of the schedule (1 is linear; Wan/Cosmos students use 5).
        max_t: Cap on the first rung, in (0, 1].

    Returns:
        A strictly decreasing list of floats ending in exactly 0.

    Examples:
        >>> [round(t, 4) for t in make_t_list(4, shift=5.0)]
        [0.999, 0.9375, 0.8333, 0.625, 0.0]
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite float > 0, got {shift!r}")
    if not (isinstance(max_t, (int, float)) and 0.0 < max_t <= 1.0):
        raise ValueError(f"max_t must be in (0, 1], got {max_t!r}")
    ladder = [
        min(_shift_map(1.0 - i / num_steps, float(shift)), float(max_t)) for i in range(num_steps)
    ]
    ladder.append(0.0)
    return list(check_t_list(ladder, "make_t_list result"))


def resolution_shift(
    seq_len: int,
    *,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
) -> float:
    r"""Resolution-dependent shift (Flux / diffusers ``calculate_shift``): :math:`e^{\mu}`.

    .. math::

        \mu = \text{base\_shift} + (\text{seq\_len} - \text{base\_seq\_len})
        \frac{\text{max\_shift} - \text{base\_shift}}{\text{max\_seq\_len} - \text{base\_seq\_len}}

    Use it as ``SampleTimestepConfig(time_dist_type="shifted", shift=resolution_shift(L))`` so
    training draws t with the same shift inference uses (the shift map with
    :math:`s = e^{\mu}` equals Flux's ``time_shift(mu, 1, t)``).

    Args:
        seq_len: Number of image tokens (latent patches).
        base_shift: mu at ``base_seq_len``.
        max_shift: mu at ``max_seq_len``.
        base_seq_len: First anchor length.
        max_seq_len: Second anchor length (!= ``base_seq_len``).

    Returns:
        The shift :math:`e^{\mu}` as a Python float.

    Example:
        >>> round(resolution_shift(4096), 6) == round(math.exp(1.15), 6)
        True
    """
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + (seq_len - base_seq_len) * slope)
