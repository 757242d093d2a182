r"""sCM (Lu & Song 2024): continuous-time consistency in TrigFlow, trained through a JVP.

The student, a rectified-flow network, is read in TrigFlow coordinates
(:mod:`fastgen.consistency.trigflow`) as :math:`F_\theta(\hat x, \hat t)`; its consistency
function is :math:`f_\theta = \cos\hat t\, \hat x - \sigma_d \sin\hat t\, F_\theta`. Asking
:math:`\frac{d}{d\hat t} f_\theta(\hat x_{\hat t}, \hat t) = 0` along the PF-ODE
:math:`\frac{d\hat x}{d\hat t}` gives the tangent (sg: stop-gradient, :math:`w` the warmup)

.. math::

    g = -\cos^2\hat t\,\big(\sigma_d F_\theta^- - \tfrac{d\hat x}{d\hat t}\big)
        - w\,\big(\cos\hat t \sin\hat t\ \hat x + \sigma_d\, \tfrac{d}{d\hat t} F_\theta^-\big),
    \qquad \tfrac{d}{d\hat t} F_\theta^- = \partial_{\hat x} F\ \cos\hat t \sin\hat t\,
    \tfrac{d\hat x}{d\hat t} + \partial_{\hat t} F\ \cos\hat t \sin\hat t

(the JVP along :math:`\cos\hat t \sin\hat t\,(\frac{d\hat x}{d\hat t}, 1)`), normalized
:math:`g / (\|g\| + c)`, and the loss regresses :math:`F_\theta` on :math:`\operatorname{sg}(F_\theta + g)`
with sCM's adaptive weighting (a learned per-time log-variance). The ODE's velocity
:math:`\frac{d\hat x}{d\hat t}` is the (guided) teacher's (distillation, sCD) or the conditional
one :math:`-\sin\hat t\, x_0 + \cos\hat t\, \sigma_d \epsilon` (training, sCT).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastgen.checks import check_float_tensor, check_pair, check_t, expand_like
from fastgen.consistency.calls import call_wide
from fastgen.consistency.config import SCMConfig
from fastgen.consistency.jvp import jvp
from fastgen.consistency.trigflow import (
    check_angle,
    check_sigma_data,
    flow_to_trigflow,
    input_to_rf,
    time_to_rf,
    time_to_trigflow,
)
from fastgen.dmd.calls import NetworkCall, check_kwargs
from fastgen.dmd.guidance import check_scale, classifier_free_guidance
from fastgen.flow_matching import DENOM_MIN, convert_prediction
from fastgen.precision import compute_dtype, compute_once, widen
from fastgen.pred_type import flow_name
from fastgen.timesteps import sample_timesteps

__all__ = ["AdaptiveWeight", "SCMPipeline", "scm_loss"]


class AdaptiveWeight(nn.Module):
    r"""sCM's adaptive weighting network: a log-variance per time, from Fourier features.

    .. math::

        \log\sigma^2(t) = W \sqrt{2} \cos\big(2\pi (f\, t + \phi)\big) + b

    with fixed random frequencies :math:`f` and phases :math:`\phi` (persistent buffers, so a
    checkpoint restores them) and a linear head initialised to zero (the weighting starts
    uniform).

    Args:
        channels: Number of Fourier features.
        seed: Seed of the frequencies and phases.

    Example:
        >>> import torch
        >>> AdaptiveWeight()(torch.tensor([0.1, 0.9]))
        tensor([0., 0.], grad_fn=<ViewBackward0>)
    """

    def __init__(self, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(channels, generator=gen))
        self.register_buffer("phases", torch.rand(channels, generator=gen))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        """The log-variance ``[B]`` for times ``t`` ``[B]`` (in the head's dtype)."""
        t = t.to(self.freqs.dtype)
        feats = math.sqrt(2.0) * torch.cos(2 * math.pi * (t[:, None] * self.freqs + self.phases))
        return self.linear(feats.to(self.linear.weight.dtype)).view(-1)


def scm_loss(
    trigflow: Tensor,
    trigflow_jvp: Tensor,
    velocity: Tensor,
    x_hat: Tensor,
    t_hat: Tensor,
    t: Tensor,
    logvar: Tensor | None = None,
    *,
    sigma_data: float = 0.5,
    warmup: float | Tensor = 1.0,
    norm_const: float = 0.1,
    spatial_invariance: bool = True,
    prior_weighting: bool = True,
    divide_by_dim: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""sCM's loss from the student's TrigFlow output, its JVP and the ODE's velocity.

    .. math::

        g = -\cos^2\hat t\,(\sigma_d F^- - \dot x) - w\,(\cos\hat t\sin\hat t\,\hat x
        + \sigma_d \dot F^-), \qquad \tilde g = \frac{g}{\|g\| / \sqrt{D} + c}

    .. math::

        \mathcal L = \operatorname{mean}_i\Big[\frac{\lambda(t_i)}{e^{\ell_i} D}\
        \operatorname{mean}\big((F_i - F_i^- - \tilde g_i)^2\big) + \ell_i\Big]

    with :math:`F^- = \operatorname{sg}(F)`, :math:`\lambda(t) = 1/\max(t, 10^{-6})` (prior
    weighting; 1 without), :math:`\ell` the log-variance (0 without), :math:`D` the per-sample
    size (1 when ``divide_by_dim`` is off; the plain norm when ``spatial_invariance`` is off).
    Gradients reach ``trigflow`` and ``logvar`` only.

    Args:
        trigflow: The student's :math:`F_\theta(\hat x, \hat t)`, ``[B, ...]``.
        trigflow_jvp: Its derivative :math:`\dot F` along the ODE (no gradient), same shape.
        velocity: The ODE's :math:`\dot x = d\hat x / d\hat t`, same shape.
        x_hat: TrigFlow latents :math:`\hat x`, same shape.
        t_hat: Angles ``[B]`` in :math:`[0, \pi/2]`.
        t: The matching rectified-flow times ``[B]`` (for the prior weighting).
        logvar: The adaptive log-variance ``[B]``, or None.
        sigma_data: :math:`\sigma_d`.
        warmup: :math:`w` in [0, 1] (float or 0-d tensor).
        norm_const: :math:`c` > 0.
        spatial_invariance: Normalize by the root-mean-square norm.
        prior_weighting: Weight by :math:`1/t`.
        divide_by_dim: Divide by :math:`D`.
        dtype: The output dtype (default: ``trigflow``'s).

    Returns:
        A 0-d tensor in ``dtype`` (computed in float64, rounded once).

    Example:
        >>> import torch
        >>> f = torch.zeros(2, 3, requires_grad=True)
        >>> z, t = torch.zeros(2, 3), torch.tensor([0.5, 0.5])
        >>> scm_loss(f, z, z, z, torch.tensor([0.7, 0.7]), t)
        tensor(0., grad_fn=<ToCopyBackward0>)
    """
    sd = check_sigma_data(sigma_data)
    check_pair("trigflow", trigflow, "trigflow_jvp", trigflow_jvp)
    check_pair("trigflow", trigflow, "velocity", velocity)
    check_pair("trigflow", trigflow, "x_hat", x_hat)
    if trigflow.ndim < 2:
        raise ValueError(
            f"trigflow must have a batch dim and data dims (ndim >= 2), got {tuple(trigflow.shape)}"
        )
    t_hat = check_angle(t_hat, trigflow)
    t = check_t(t, trigflow)
    check_scale("norm_const", norm_const)
    if not norm_const > 0:
        raise ValueError(f"norm_const must be > 0, got {norm_const!r}")
    extra = ()
    if logvar is not None:
        check_float_tensor("logvar", logvar)
        if logvar.shape != trigflow.shape[:1]:
            raise ValueError(
                f"logvar must have shape [B] = {tuple(trigflow.shape[:1])}, got "
                f"{tuple(logvar.shape)}"
            )
        extra = (logvar,)
    dims = tuple(range(1, trigflow.ndim))
    size = trigflow[0].numel()
    norm_scale = 1.0 / math.sqrt(size) if spatial_invariance else 1.0
    dim_div = float(size) if divide_by_dim else 1.0

    def formula(f, f_jvp, vel, x_hat, a, t, w, *logvar) -> Tensor:
        f_ = f.detach()
        c, s = torch.cos(a), torch.sin(a)
        g = -c * c * (sd * f_ - vel) - w * (c * s * x_hat + sd * f_jvp)
        g = g.detach()
        norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True) * norm_scale
        g = g / (norm + norm_const)
        unweighted = torch.mean((f - f_ - g) ** 2, dim=dims)
        weight = 1.0 / t.view(-1).clamp_min(DENOM_MIN) if prior_weighting else 1.0
        if not logvar:
            return (weight / dim_div * unweighted).mean()
        lv = logvar[0]
        return (weight / (torch.exp(lv) * dim_div) * unweighted + lv).mean()

    return compute_once(
        formula,
        *(trigflow, trigflow_jvp.detach(), velocity.detach(), x_hat.detach(), t_hat, t, warmup),
        *extra,
        dtype=dtype or trigflow.dtype,
    )


class SCMPipeline:
    """sCM's loss around a student, a frozen teacher (distillation) and an adaptive weighting.

    Not an ``nn.Module``: it holds references. Networks are rectified-flow networks called
    diffusers-style (:class:`fastgen.dmd.calls.NetworkCall`); the pipeline reads them in
    TrigFlow coordinates. The loss compiles with ``fullgraph=True`` into one frame, the JVP
    inside.

    Args:
        student: The consistency model being trained (a rectified-flow network).
        config: The hyperparameters.
        teacher: The pretrained flow model (``mode="distillation"``); frozen here.
        weight_net: The adaptive weighting (:class:`AdaptiveWeight`, trained with the student),
            or None for uniform weighting.
        call: How the networks are called.

    Raises:
        TypeError: A network is not an ``nn.Module``; ``config`` is not an ``SCMConfig``.
        ValueError: Distillation without a teacher, or training with one.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(5, 4)
        ...     def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        ...         return self.lin(torch.cat([hidden_states, timestep[:, None]], 1))
        >>> pipe = SCMPipeline(Net(), SCMConfig(mode="training"), weight_net=AdaptiveWeight())
        >>> sorted(pipe.compute_loss(torch.randn(8, 4), torch.randn(8, 4)))
        ['logvar', 'scm', 'total', 'unweighted']
    """

    def __init__(
        self,
        student: nn.Module,
        config: SCMConfig,
        *,
        teacher: nn.Module | None = None,
        weight_net: nn.Module | None = None,
        call: NetworkCall | None = None,
    ) -> None:
        nets = (("student", student), ("teacher", teacher), ("weight_net", weight_net))
        for name, net in nets:
            if (net is not None or name == "student") and not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(net).__name__}")
        if not isinstance(config, SCMConfig):
            raise TypeError(f"config must be an SCMConfig, got {type(config).__name__}")
        if call is not None and not isinstance(call, NetworkCall):
            raise TypeError(f"call must be a NetworkCall or None, got {type(call).__name__}")
        if (config.mode == "distillation") != (teacher is not None):
            raise ValueError(
                "mode='distillation' needs teacher=, mode='training' takes none; got mode="
                f"{config.mode!r} with teacher={'set' if teacher is not None else 'None'}"
            )
        self.student = student
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.weight_net = weight_net
        self.config = config
        self.call = call or NetworkCall(
            num_train_timesteps=config.num_train_timesteps, timestep_dtype=config.timestep_dtype
        )
        self._pred = flow_name(config.pred_type)

    def trigflow(
        self,
        model: nn.Module,
        role: str,
        x_hat: Tensor,
        t_hat: Tensor,
        ehs: Tensor | None,
        kwargs: dict[str, Any],
        dtype: torch.dtype,
    ) -> Tensor:
        r"""``model`` read in TrigFlow: :math:`F(\hat x, \hat t)` in the compute dtype, from its
        prediction at the matching :math:`(x_t, t)` (inputs rounded once to ``dtype``)."""
        sd = self.config.sigma_data
        t_hat = expand_like(t_hat, x_hat)
        t = time_to_rf(t_hat, sd)
        x_t = input_to_rf(x_hat, t_hat, sd)
        raw = call_wide(self.call, model, role, x_t, t.reshape(-1), ehs, kwargs, dtype=dtype)
        v = convert_prediction(raw, x_t, t.reshape(-1), src=self._pred, dst="flow")
        return flow_to_trigflow(v, x_t, t, sd)

    def velocity(
        self,
        x0: Tensor,
        eps: Tensor,
        x_hat: Tensor,
        t_hat: Tensor,
        ehs: Tensor | None,
        neg_ehs: Tensor | None,
        kwargs: dict[str, Any],
        scale: float | None,
        dtype: torch.dtype,
        neg_kwargs: dict[str, Any] | None = None,
    ) -> Tensor:
        r"""The ODE's :math:`d\hat x / d\hat t` (no gradient): the (guided) teacher's
        :math:`\sigma_d F`, or the conditional :math:`-\sin\hat t\, x_0 + \cos\hat t\,\sigma_d\epsilon`
        (``neg_kwargs`` replace keyword arguments in the unconditional call)."""
        sd = self.config.sigma_data
        if self.config.mode == "training":
            a = expand_like(t_hat, x0)
            return -torch.sin(a) * x0 + torch.cos(a) * sd * eps
        f = self.trigflow(self.teacher, "teacher", x_hat, t_hat, ehs, kwargs, dtype)
        if scale is not None:
            uncond_kwargs = {**kwargs, **(neg_kwargs or {})}
            uncond = self.trigflow(
                self.teacher, "teacher", x_hat, t_hat, neg_ehs, uncond_kwargs, dtype
            )
            f = classifier_free_guidance(f, uncond, scale)
        return sd * f

    def compute_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        *,
        t: Tensor | None = None,
        negative_encoder_hidden_states: Tensor | None = None,
        negative_model_kwargs: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        iteration: int | Tensor = 0,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        r"""sCM's loss on a batch (:func:`scm_loss`).

        Args:
            latents: Clean latents :math:`x_0` ``[B, ...]``.
            noise: Gaussian noise :math:`\epsilon` (unit scale), same shape; TrigFlow's noise
                is :math:`\sigma_d \epsilon`.
            encoder_hidden_states: Conditioning for every network.
            t: Rectified-flow times ``[B]`` (drawn from ``config.sample_t_cfg`` when None).
            negative_encoder_hidden_states: The teacher's unconditional conditioning (CFG).
            negative_model_kwargs: Keyword arguments that replace ``model_kwargs`` in the
                unconditional teacher call (SD3's ``pooled_projections`` of the empty prompt).
            guidance_scale: Overrides ``config.guidance_scale``.
            iteration: The training iteration, for the tangent warmup: a 0-d tensor under
                ``torch.compile`` (it specializes a Python int 0 or 1 and recompiles after).
            **model_kwargs: Passed to every network call.

        Returns:
            ``{"scm", "total"}`` and, detached, ``"unweighted"`` (the mean squared step) and
            ``"logvar"`` (its mean), 0-d tensors in ``latents``' dtype.

        Raises:
            ValueError: Guidance without negative conditioning; mismatched shapes.
        """
        cfg = self.config
        check_pair("latents", latents, "noise", noise)
        check_kwargs(model_kwargs)
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        if scale is not None and cfg.mode == "distillation":
            check_scale("guidance_scale", scale)
            if negative_encoder_hidden_states is None:
                raise ValueError(
                    f"guidance_scale = {scale} needs negative_encoder_hidden_states (the "
                    "unconditional teacher call's conditioning)"
                )
        # 1. Times: rectified flow's t, TrigFlow's angle.
        n, device, dtype = latents.shape[0], latents.device, latents.dtype
        if t is None:
            t = sample_timesteps(n, cfg.sample_t_cfg, device=device)
        check_t(t, latents)
        wide, sd = compute_dtype(device), cfg.sigma_data
        t_w = widen(t, wide).reshape(n)
        t_hat = time_to_trigflow(t_w, sd)
        # 2. TrigFlow's noisy sample, kept unrounded (the network sees it rounded once).
        x0, eps = widen(latents, wide), widen(noise, wide)
        a = expand_like(t_hat, x0)
        x_hat = torch.cos(a) * x0 + torch.sin(a) * sd * eps
        ehs = encoder_hidden_states
        neg = negative_encoder_hidden_states
        with torch.no_grad():
            vel = self.velocity(
                x0, eps, x_hat, t_hat, ehs, neg, model_kwargs, scale, dtype, negative_model_kwargs
            )
        # 3. The student with gradient; its JVP along cos sin (vel, 1) without.
        f = self.trigflow(self.student, "student", x_hat, t_hat, ehs, model_kwargs, dtype)
        cs = torch.cos(t_hat) * torch.sin(t_hat)
        with torch.no_grad():
            f_jvp = jvp(
                lambda x, tt: self.trigflow(
                    self.student, "student", x, tt, ehs, model_kwargs, dtype
                ),
                (x_hat, t_hat),
                (expand_like(cs, vel) * vel, cs),
                method=cfg.jvp,
                step=cfg.jvp_fd_step,
            )
        # 4. Adaptive weighting, warmup, the loss.
        logvar = None if self.weight_net is None else self.weight_net(t_w)
        warmup = 1.0
        if cfg.tangent_warmup_steps > 0:
            it = torch.as_tensor(iteration, device=device).to(wide)
            warmup = (it / cfg.tangent_warmup_steps).clamp(max=1.0)
        loss = scm_loss(
            f,
            f_jvp,
            vel,
            x_hat,
            t_hat,
            t_w,
            logvar,
            sigma_data=sd,
            warmup=warmup,
            norm_const=cfg.tangent_norm_const,
            spatial_invariance=cfg.tangent_norm_spatial_invariance,
            prior_weighting=cfg.prior_weighting,
            divide_by_dim=cfg.divide_by_dim,
            dtype=dtype,
        )
        out = {"scm": loss, "total": loss}
        with torch.no_grad():
            # the step's size before weighting, for monitoring (scm_loss with w = 1, no prior)
            out["unweighted"] = scm_loss(
                f.detach(), f_jvp, vel, x_hat, t_hat, t_w, sigma_data=sd, warmup=warmup,
                norm_const=cfg.tangent_norm_const,
                spatial_invariance=cfg.tangent_norm_spatial_invariance,
                prior_weighting=False, divide_by_dim=False, dtype=dtype,
            )  # fmt: skip
            lv = torch.zeros(n, device=device) if logvar is None else logvar.detach()
            out["logvar"] = compute_once(torch.mean, lv, dtype=dtype)
        return out
