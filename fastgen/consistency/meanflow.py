r"""MeanFlow (Geng et al. 2025): a network :math:`u_\theta(x_t, r, t)` of the average velocity
between times r <= t, so that :math:`x_r = x_t - (t - r)\, u(x_t, r, t)` and one step from noise is
:math:`x_0 = x_1 - u(x_1, 0, 1)`.

Differentiating :math:`(t - r)\, u = \int_r^t v` in t gives the MeanFlow identity, the training
target (sg: stop-gradient):

.. math::

    u_{\text{tgt}} = v(x_t, t) - (t - r)\, \operatorname{sg}\Big(\frac{d}{dt} u_\theta(x_t, r, t)\Big),
    \qquad \frac{d}{dt} u_\theta = \partial_x u_\theta\, v + \partial_t u_\theta,

a JVP along :math:`(v, 1, 0)` in :math:`(x_t, t, r)`. :math:`v` is :math:`\epsilon - x_0`
(training) or the (guided) teacher's velocity (distillation). The network is called
diffusers-style with r under ``config.r_keyword`` (scaled like ``timestep``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastgen.checks import check_float_tensor, check_pair, check_t, expand_like
from fastgen.config import SampleTimestepConfig
from fastgen.consistency.calls import call_wide
from fastgen.consistency.config import MeanFlowConfig
from fastgen.consistency.jvp import jvp
from fastgen.dmd.calls import NetworkCall, check_kwargs
from fastgen.dmd.guidance import check_scale, classifier_free_guidance
from fastgen.flow_matching import add_noise, convert_prediction
from fastgen.precision import compute_dtype, compute_once, widen
from fastgen.pred_type import flow_name
from fastgen.timesteps import sample_timesteps

__all__ = ["MeanFlowPipeline", "meanflow_loss", "sample_t_r"]


def sample_t_r(
    n: int,
    t_cfg: SampleTimestepConfig,
    r_cfg: SampleTimestepConfig | None = None,
    *,
    r_sample_ratio: float,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    r"""MeanFlow's time pairs: t and r drawn independently, ordered, then r = t for a share.

    .. math::

        (t, r) = (\max(a, b), \min(a, b)),\quad a \sim p_t,\ b \sim p_r; \qquad
        r_i = t_i \ \text{for}\ i < n_{\text{fm}},\ n_{\text{fm}} = \#\{i : u_i \ge \rho\}

    with :math:`u_i \sim U(0, 1)` and :math:`\rho` = ``r_sample_ratio``: on average a share
    :math:`1 - \rho` of the batch (its first rows) trains plain flow matching. No host sync.

    Args:
        n: Batch size.
        t_cfg: Distribution of t (and of r when ``r_cfg`` is None).
        r_cfg: Distribution of r, or None.
        r_sample_ratio: :math:`\rho` in [0, 1].
        device: Where the draws live.
        dtype: Their dtype.

    Returns:
        ``(t, r)``, each ``[n]`` in ``dtype``, with ``r <= t``.

    Example:
        >>> import fastgen
        >>> t, r = sample_t_r(8, fastgen.SampleTimestepConfig(), r_sample_ratio=0.0, device="cpu")
        >>> bool((t == r).all())
        True
    """
    if isinstance(r_sample_ratio, bool) or not isinstance(r_sample_ratio, (int, float)):
        raise TypeError(f"r_sample_ratio must be a float in [0, 1], got {r_sample_ratio!r}")
    if not 0.0 <= r_sample_ratio <= 1.0:
        raise ValueError(f"r_sample_ratio must lie in [0, 1], got {r_sample_ratio!r}")
    a = sample_timesteps(n, t_cfg, device=device, dtype=dtype)
    b = sample_timesteps(n, r_cfg or t_cfg, device=device, dtype=dtype)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    n_fm = (torch.rand(n, device=a.device) >= r_sample_ratio).sum()
    return t, torch.where(torch.arange(n, device=a.device) < n_fm, t, r)


def meanflow_loss(
    u: Tensor,
    u_jvp: Tensor,
    v: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    loss_type: str = "opt_grad",
    warmup: float | Tensor = 1.0,
    power: float = 1.0,
    const: float = 0.1,
    spatial_invariance: bool = False,
) -> Tensor:
    r"""MeanFlow's loss from the network's output, its JVP and the target velocity.

    With :math:`w` the tangent warmup and :math:`D` the per-sample size,

    .. math::

        \text{l2:}\quad e_i = \big\|u_i - v_i + w (t_i - r_i) \dot u_i\big\|^2, \quad
        \mathcal L = \operatorname{mean}_i\ \frac{e_i}{(\operatorname{sg}(e_i) + c)^p}

    .. math::

        \text{opt\_grad:}\quad g_i = v_i - \operatorname{sg}(u_i) - w (t_i - r_i) \dot u_i
        \ (\times D^{-1/2}), \quad
        \mathcal L = \operatorname{mean}_i\ \Big\|u_i - \operatorname{sg}\Big(u_i
        + \frac{g_i}{(\|g_i\| + c)^p}\Big)\Big\|^2

    :math:`\dot u`, :math:`v` and the weights carry no gradient; only :math:`u` does.

    Args:
        u: The network's average velocity :math:`u_\theta(x_t, r, t)`, ``[B, ...]``.
        u_jvp: Its derivative along the ODE, :math:`\frac{d}{dt} u_\theta`, same shape.
        v: The target velocity at :math:`(x_t, t)`, same shape.
        t: Times ``[B]``.
        r: Times ``[B]``, ``r <= t``.
        loss_type: ``"l2"`` or ``"opt_grad"``.
        warmup: :math:`w` in [0, 1], a float or a 0-d tensor.
        power: :math:`p` >= 0.
        const: :math:`c` > 0.
        spatial_invariance: ``opt_grad``: scale :math:`g` by :math:`D^{-1/2}`.

    Returns:
        A 0-d tensor in ``u``'s dtype (computed in float64, rounded once).

    Example:
        >>> import torch
        >>> u = torch.ones(2, 3, requires_grad=True)
        >>> t, r = torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])
        >>> meanflow_loss(u, torch.zeros(2, 3), torch.ones(2, 3), t, r, loss_type="l2")
        tensor(0., grad_fn=<ToCopyBackward0>)
    """
    if loss_type not in ("l2", "opt_grad"):
        raise ValueError(f"loss_type must be 'l2' or 'opt_grad', got {loss_type!r}")
    check_pair("u", u, "u_jvp", u_jvp)
    check_pair("u", u, "v", v)
    if u.ndim < 2:
        raise ValueError(f"u must have a batch dim and data dims (ndim >= 2), got {tuple(u.shape)}")
    t, r = check_t(t, u), check_t(r, u)
    for name, value in (("power", power), ("const", const)):
        check_scale(name, value)
    if not const > 0:
        raise ValueError(f"const must be > 0, got {const!r}")
    if isinstance(warmup, Tensor):
        check_float_tensor("warmup", warmup)
    dims = tuple(range(1, u.ndim))
    inv_sqrt_d = 1.0 / math.sqrt(u[0].numel()) if spatial_invariance else 1.0

    def formula(u: Tensor, u_jvp: Tensor, v: Tensor, t: Tensor, r: Tensor, w) -> Tensor:
        drift = (w * (t - r) * u_jvp).detach()
        if loss_type == "l2":
            err = ((u - (v.detach() - drift)) ** 2).sum(dims)
            return (err / (err.detach() + const) ** power).mean()
        tangent = ((v - u - drift) * inv_sqrt_d).detach()
        norm = torch.linalg.vector_norm(tangent.flatten(1), dim=1)
        weight = expand_like(1.0 / (norm + const) ** power, tangent)
        return ((u - (u.detach() + tangent * weight)) ** 2).sum(dims).mean()

    return compute_once(formula, u, u_jvp, v, t, r, warmup, dtype=u.dtype)


def _fd_steps(t: Tensor, r: Tensor, h: float) -> tuple[Tensor, Tensor]:
    """Per-sample difference steps that keep t +- h inside [r, 1] (one-sided at the ends)."""
    h_plus = torch.where(t + h <= 1.0, h, 0.0)
    h_minus = torch.where((t - h >= 0.0) & (t - h > r), h, 0.0)
    return h_plus, h_minus


class MeanFlowPipeline:
    """MeanFlow's loss around a student (predicting u) and, for distillation, a frozen teacher.

    Not an ``nn.Module``: it holds references. The loss compiles with ``fullgraph=True`` into one
    frame with the JVP inside (no host sync, no recompile across batch sizes).

    Args:
        student: The average-velocity network, called
            ``student(hidden_states=x_t, timestep=t, <r_keyword>=r, encoder_hidden_states=c, ...)``.
        config: The hyperparameters.
        teacher: The pretrained flow model (``mode="distillation"``); frozen here.
        call: How the networks are called (:class:`fastgen.dmd.calls.NetworkCall`).

    Raises:
        TypeError: A network is not an ``nn.Module``; ``config`` is not a ``MeanFlowConfig``.
        ValueError: Distillation without a teacher, or a teacher in training mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class U(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(6, 4)
        ...     def forward(self, hidden_states, timestep, r, encoder_hidden_states=None):
        ...         return self.lin(torch.cat([hidden_states, timestep[:, None], r[:, None]], 1))
        >>> pipe = MeanFlowPipeline(U(), MeanFlowConfig())
        >>> losses = pipe.compute_loss(torch.randn(8, 4), torch.randn(8, 4))
        >>> sorted(losses)
        ['flow_matching', 'meanflow', 'total']
    """

    def __init__(
        self,
        student: nn.Module,
        config: MeanFlowConfig,
        *,
        teacher: nn.Module | None = None,
        call: NetworkCall | None = None,
    ) -> None:
        for name, net in (("student", student), ("teacher", teacher)):
            if net is not None and not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(net).__name__}")
        if not isinstance(config, MeanFlowConfig):
            raise TypeError(f"config must be a MeanFlowConfig, got {type(config).__name__}")
        if call is not None and not isinstance(call, NetworkCall):
            raise TypeError(f"call must be a NetworkCall or None, got {type(call).__name__}")
        if (config.mode == "distillation") != (teacher is not None):
            raise ValueError(
                "mode='distillation' needs teacher=, mode='training' takes none; got mode="
                f"{config.mode!r} with teacher={'set' if teacher is not None else 'None'}"
            )
        self.student = student
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.config = config
        self.call = call or NetworkCall(
            num_train_timesteps=config.num_train_timesteps, timestep_dtype=config.timestep_dtype
        )
        self._pred = flow_name(config.pred_type)

    def _u(self, x, t, r, ehs, kwargs, dtype) -> Tensor:
        """The student's u at wide ``(x, t)`` with r, raw (in ``dtype``)."""
        rk = self.config.r_keyword
        return call_wide(
            self.call, self.student, "student", x, t, ehs, kwargs, dtype=dtype, times={rk: r}
        )

    def _teacher_flow(self, x, t, ehs, kwargs, dtype) -> Tensor:
        raw = call_wide(self.call, self.teacher, "teacher", x, t, ehs, kwargs, dtype=dtype)
        return convert_prediction(raw, x, t, src=self._pred, dst="flow")

    def _window(self, t: Tensor, inside: float, outside: float) -> Tensor:
        cfg = self.config
        on = (t >= cfg.guidance_t_start) & (t <= cfg.guidance_t_end)
        return torch.where(on, inside, outside).to(t.dtype)

    def velocity(
        self,
        x0: Tensor,
        eps: Tensor,
        x_t: Tensor,
        t: Tensor,
        ehs: Tensor | None,
        neg_ehs: Tensor | None,
        kwargs: dict[str, Any],
        scale: float | None,
        dtype: torch.dtype | None = None,
        neg_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The target velocity at wide ``(x_t, t)`` (no gradient) and the conditioning the
        student then sees (training-time guidance swaps the first rows to ``neg_ehs``).
        ``dtype`` is what the networks take (the latents' dtype; default ``x0``'s);
        ``neg_kwargs`` replace keyword arguments in the unconditional calls."""
        cfg = self.config
        dtype = x0.dtype if dtype is None else dtype
        uncond_kwargs = {**kwargs, **(neg_kwargs or {})}
        if cfg.mode == "distillation":
            v = self._teacher_flow(x_t, t, ehs, kwargs, dtype)
            if scale is None:
                return v, ehs
            uncond = self._teacher_flow(x_t, t, neg_ehs, uncond_kwargs, dtype)
            return classifier_free_guidance(v, uncond, self._window(t, scale, 1.0)), ehs
        v = eps - x0
        mixture = cfg.guidance_mixture_ratio
        if scale is None and mixture is None:
            return v, ehs
        u_neg = widen(self._u(x_t, t, t, neg_ehs, uncond_kwargs, dtype), t.dtype)
        s = expand_like(self._window(t, 1.0 if scale is None else scale, 1.0), v)
        if mixture is None:
            guided = u_neg + s * (v - u_neg)
        else:
            m = expand_like(self._window(t, mixture, 0.0), v)
            u_cond = widen(self._u(x_t, t, t, ehs, kwargs, dtype), t.dtype)
            guided = s * v + (1.0 - s - m) * u_neg + m * u_cond
        n = v.shape[0]
        if cfg.cond_dropout_prob == 0.0:
            return guided, ehs
        n_drop = (torch.rand(n, device=v.device) < cfg.cond_dropout_prob).sum()
        keep = torch.arange(n, device=v.device) >= n_drop
        v = torch.where(expand_like(keep, v), guided, v)
        if ehs is not None:
            ehs = torch.where(expand_like(keep, ehs), ehs, neg_ehs)
        return v, ehs

    def compute_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        *,
        t: Tensor | None = None,
        r: Tensor | None = None,
        negative_encoder_hidden_states: Tensor | None = None,
        negative_model_kwargs: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        iteration: int | Tensor = 0,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        r"""MeanFlow's loss on a batch (:func:`meanflow_loss` of the student's u, its JVP along
        the ODE and the target velocity).

        Args:
            latents: Clean latents :math:`x_0` ``[B, ...]``.
            noise: Gaussian noise :math:`\epsilon`, same shape.
            encoder_hidden_states: Conditioning for every network.
            t: Times ``[B]`` (drawn by :func:`sample_t_r` when None, together with r).
            r: Times ``[B]``, ``r <= t`` (given with ``t``).
            negative_encoder_hidden_states: Unconditional conditioning, needed with guidance.
            negative_model_kwargs: Keyword arguments that replace ``model_kwargs`` in the
                unconditional calls (SD3's ``pooled_projections`` of the empty prompt).
            guidance_scale: Overrides ``config.guidance_scale``.
            iteration: The training iteration, for the tangent warmup: a 0-d tensor under
                ``torch.compile`` (it specializes a Python int 0 or 1 and recompiles after).
            **model_kwargs: Passed to every network call.

        Returns:
            ``{"meanflow", "total"}`` and ``"flow_matching"`` (the monitoring error
            :math:`\operatorname{mean}(u - (\epsilon - x_0))^2`, detached), 0-d tensors in
            ``latents``' dtype.

        Raises:
            ValueError: Only one of ``t``, ``r``; guidance without negative conditioning;
                mismatched shapes.
        """
        cfg = self.config
        check_pair("latents", latents, "noise", noise)
        check_kwargs(model_kwargs)
        if cfg.r_keyword in model_kwargs:
            raise TypeError(f"{cfg.r_keyword} is set by the pipeline; do not pass it")
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        if scale is not None:
            check_scale("guidance_scale", scale)
        needs_neg = scale is not None or (
            cfg.mode == "training" and cfg.guidance_mixture_ratio is not None
        )
        if needs_neg and negative_encoder_hidden_states is None:
            raise ValueError("guidance needs negative_encoder_hidden_states")
        if (t is None) != (r is None):
            raise ValueError("pass both t and r, or neither (then both are drawn)")
        # 1. Times.
        n, device, dtype = latents.shape[0], latents.device, latents.dtype
        if t is None:
            t, r = sample_t_r(
                n,
                cfg.sample_t_cfg,
                cfg.sample_r_cfg,
                r_sample_ratio=cfg.r_sample_ratio,
                device=device,
            )
        check_t(t, latents)
        check_t(r, latents)
        wide = compute_dtype(device)
        t_w, r_w = widen(t, wide), widen(r, wide)
        # 2. The noisy input (rounded once: what the network sees) and the target velocity.
        x_t = widen(add_noise(latents, noise, t), wide)
        x0, eps = widen(latents, wide), widen(noise, wide)
        with torch.no_grad():
            v, ehs = self.velocity(
                x0, eps, x_t, t_w, encoder_hidden_states,
                negative_encoder_hidden_states, model_kwargs, scale, dtype,
                negative_model_kwargs,
            )  # fmt: skip
        # 3. The JVP along (v, 1) in (x_t, t), r fixed: no gradient.
        with torch.no_grad():
            u_jvp = jvp(
                lambda x, tt: widen(self._u(x, tt, r_w, ehs, model_kwargs, dtype), wide),
                (x_t, t_w),
                (v, torch.ones_like(t_w)),
                method=cfg.jvp,
                step=_fd_steps(t_w, r_w, cfg.jvp_fd_step) if cfg.jvp != "forward" else 0.0,
            )
        # 4. u with gradient, and the loss.
        u = self._u(x_t, t_w, r_w, ehs, model_kwargs, dtype)
        steps = cfg.tangent_warmup_steps
        warmup = 1.0
        if steps > 0:
            it = torch.as_tensor(iteration, device=device).to(wide)
            warmup = (it / steps).clamp(max=1.0)
        loss = meanflow_loss(
            u,
            u_jvp,
            v,
            t_w,
            r_w,
            loss_type=cfg.loss_type,
            warmup=warmup,
            power=cfg.adaptive_weight_power,
            const=cfg.adaptive_weight_const,
            spatial_invariance=cfg.tangent_spatial_invariance,
        )
        fm = compute_once(
            lambda u, e, x: torch.mean((u - (e - x)) ** 2), u.detach(), eps, x0, dtype=dtype
        )
        return {"meanflow": loss, "flow_matching": fm, "total": loss}
