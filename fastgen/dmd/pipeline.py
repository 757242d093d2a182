r"""The DMD2 training step as three loss calls: student, fake score, discriminator.

:class:`DMDPipeline` holds the networks and the config; the caller owns optimizers, the 5:1
alternation and the loop. Every ``compute_*`` is one ``torch.compile(fullgraph=True)`` frame
with the user's networks inside: no host sync, no Python branch on tensor values, and the same
sequence of network calls on every rank (so FSDP's collectives line up without a broadcast).

Student input (``student_sample_steps`` = K):

- K = 1: :math:`t_s = \text{max\_t}`, :math:`x_s = \text{max\_t}\,\epsilon`.
- K > 1: each sample draws its own rung :math:`k \sim U\{0..K-1\}` of ``t_list`` and
  :math:`x_s = \text{add\_noise}(x_0, \epsilon, t_k)` on real latents, or, with
  ``backward_simulation``, on the current student's own sample: the student is unrolled without
  grad from pure noise through rungs :math:`0..K-2` (always all of them, so the graph and the
  call count do not depend on the draw), each sample keeps the x0 produced after its k-th call,
  and rung 0 starts from :math:`t_0 \epsilon`. Cost: K - 1 gradient-free student forwards per
  loss call (a batch-shared rung averages (K - 1) / 2, but needs a host read and a graph per
  rung).

Then :math:`g = \hat x_0^{\text{student}}(x_s, t_s)`, :math:`t \sim` ``sample_t_cfg``,
:math:`x_t = \text{add\_noise}(g, \epsilon', t)`, and

.. math::

    \mathcal{L}_{\text{student}} = \text{vsd}\big(g,\ \text{cfg}(\hat x_0^{\text{teacher}}),\
    \hat x_0^{\text{fake}}\big) + \lambda_{\text{gan}}\, \text{softplus}(-D(\phi(x_t)))

Teacher and fake-score x0 and the guidance are computed in float64 (float32 under that
precision policy) and enter the VSD loss unrounded; every loss is rounded once to the latents'
dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastgen._rounding import round_once
from fastgen.checks import check_pair
from fastgen.dmd.capture import FeatureCapture, feature_capture_of
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.ema import ExponentialMovingAverage
from fastgen.dmd.factory import is_sharded
from fastgen.dmd.guidance import check_scale, classifier_free_guidance
from fastgen.dmd.state import check_state, load_network_state, network_state
from fastgen.errors import CheckpointError
from fastgen.flow_matching import add_noise, convert_prediction, x0_to_eps
from fastgen.losses import dsm_loss, gan_disc_loss, gan_gen_loss, r1_loss, vsd_loss
from fastgen.precision import compute_dtype, widen
from fastgen.timesteps import rungs_at, sample_from_t_list, sample_timesteps

__all__ = ["DMDPipeline", "unwrap_output"]

# The keyword arguments the pipeline itself passes to every network.
_RESERVED = ("hidden_states", "timestep", "encoder_hidden_states")


def _flow_name(pred_type: str) -> str:
    return "flow" if pred_type == "v" else pred_type


def unwrap_output(out: Any, role: str) -> Tensor:
    """A diffusers-style output: a tensor, a tuple (first element), or ``.sample``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and len(out) > 0 and isinstance(out[0], Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise TypeError(
        f"the {role} returned {type(out).__name__}; expected a Tensor, a tuple whose first "
        f"element is a Tensor, or an object with a .sample Tensor (diffusers' outputs)"
    )


def _is_per_sample(value: Any, n: int) -> bool:
    """A keyword argument with one entry per sample: a tensor whose first dim is the batch."""
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n


def _gather_per_sample(
    kwargs: dict[str, Any], index: Tensor, n: int
) -> tuple[dict[str, Any], set[str]]:
    """``kwargs`` with every batch-shaped tensor (first dim ``n``) gathered at ``index``."""
    out, gathered = {}, set()
    for key, value in kwargs.items():
        if _is_per_sample(value, n):
            out[key] = value.index_select(0, index)
            gathered.add(key)
        elif isinstance(value, (list, tuple)) and len(value) == n and n > 1:
            raise ValueError(
                f"rung_sampling='stratified' gathers per-sample keyword arguments on the device: "
                f"pass {key!r} as a tensor (batch first), not a {type(value).__name__} of {n}"
            )
        else:
            out[key] = value
    return out, gathered


class DMDPipeline:
    """DMD2's three losses around a student, a frozen teacher, a fake score (and a discriminator).

    Not an ``nn.Module``: it holds references. The teacher is frozen here (``eval()``,
    ``requires_grad_(False)``). Networks are called diffusers-style, by keyword:
    ``model(hidden_states=x_t, timestep=t, encoder_hidden_states=c, **model_kwargs)``, and may
    return a tensor, a tuple or an object with ``.sample``. With ``num_train_timesteps`` set,
    ``timestep`` is ``t * num_train_timesteps`` in float32 (``config.timestep_dtype``).

    Args:
        student: The generator being trained (also the one unrolled for backward simulation).
        teacher: The pretrained model; for the GAN branch, with a feature capture attached
            (:func:`~fastgen.dmd.attach_feature_capture`).
        fake_score: Trained to follow the student's distribution
            (:func:`~fastgen.dmd.create_fake_score`).
        config: The hyperparameters.
        discriminator: Maps the captured teacher features (a list of tensors) to logits
            ``[B, n_heads]``; required when ``config.gan_loss_weight_gen > 0``.

    Raises:
        TypeError: A network is not an ``nn.Module`` or ``config`` is not a ``DMDConfig``.
        ValueError: The GAN branch is on without a discriminator or a teacher feature capture.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(4, 4)
        ...     def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        ...         return self.lin(hidden_states) * timestep[:, None]
        >>> teacher = Net()
        >>> pipe = DMDPipeline(Net(), teacher, Net(), DMDConfig())
        >>> losses = pipe.compute_student_loss(torch.randn(8, 4), torch.randn(8, 4))
        >>> sorted(losses), losses["total"].shape
        (['total', 'vsd'], torch.Size([]))
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        fake_score: nn.Module,
        config: DMDConfig,
        *,
        discriminator: nn.Module | None = None,
    ) -> None:
        for name, net in (("student", student), ("teacher", teacher), ("fake_score", fake_score)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(net).__name__}")
        if discriminator is not None and not isinstance(discriminator, nn.Module):
            raise TypeError(
                f"discriminator must be an nn.Module or None, got {type(discriminator).__name__}"
            )
        if not isinstance(config, DMDConfig):
            raise TypeError(f"config must be a DMDConfig, got {type(config).__name__}")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake_score = fake_score
        self.discriminator = discriminator
        self.config = config
        self._gan = config.gan_loss_weight_gen > 0
        self._capture: FeatureCapture | None = feature_capture_of(teacher)
        self._disc_sharded = discriminator is not None and is_sharded(discriminator)
        if self._gan and discriminator is None:
            raise ValueError("gan_loss_weight_gen > 0 needs a discriminator= for DMDPipeline")
        if discriminator is not None and self._capture is None:
            raise ValueError(
                "a discriminator reads teacher features: attach a capture to the teacher first, "
                "fastgen.dmd.attach_feature_capture(teacher, taps=[...])"
            )
        # Constants the hot path branches on, fixed once (static under torch.compile).
        self._pred = _flow_name(config.pred_type)
        self._fake_pred = _flow_name(config.fake_score_pred_type or config.pred_type)
        self._steps = config.student_sample_steps
        self._t_list = config.sample_t_cfg.t_list
        self._max_t = config.sample_t_cfg.max_t
        self._t_scale = config.num_train_timesteps
        self._ema = ExponentialMovingAverage(student, config.ema) if config.ema else None
        self._iteration = 0

    # --- properties ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the student's first parameter (CPU for a parameterless student)."""
        for p in self.student.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the student's first parameter (float32 for a parameterless student)."""
        for p in self.student.parameters():
            return p.dtype
        return torch.float32

    @property
    def ema(self) -> ExponentialMovingAverage | None:
        """The student's EMA (``None`` when ``config.ema`` is ``None``)."""
        return self._ema

    def sample_timesteps(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``n`` perturbation timesteps from ``config.sample_t_cfg`` (on the student's device)."""
        return sample_timesteps(
            n, self.config.sample_t_cfg, device=device or self.device, dtype=dtype
        )

    # --- network calls ------------------------------------------------------------------

    def _timestep(self, t: Tensor, x_t: Tensor) -> Tensor:
        if self._t_scale is None:
            return t
        dtype = torch.float32 if self.config.timestep_dtype == "float32" else x_t.dtype
        return round_once(widen(t, compute_dtype(t.device)) * float(self._t_scale), dtype)

    def _call(
        self,
        model: nn.Module,
        role: str,
        x_t: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> Tensor:
        """Run ``model`` on ``(x_t, t)`` and return its raw prediction (checked)."""
        kwargs = dict(model_kwargs)
        kwargs["hidden_states"] = x_t
        kwargs["timestep"] = self._timestep(t, x_t)
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        raw = unwrap_output(model(**kwargs), role)
        check_pair(f"{role} output", raw, "hidden_states", x_t)
        return raw

    def _x0(self, raw: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 from a raw prediction, in ``x_t``'s dtype (``x_t`` in the compute dtype keeps it
        unrounded)."""
        return convert_prediction(raw, x_t, t, src=self._pred, dst="x0")

    def _student_x0(self, x_t, t, ehs, model_kwargs) -> Tensor:
        return self._x0(self._call(self.student, "student", x_t, t, ehs, model_kwargs), x_t, t)

    def _batched_teacher(
        self,
        x_t: Tensor,
        t: Tensor,
        ehs: Tensor | None,
        neg_ehs: Tensor,
        kwargs: dict[str, Any],
        neg_kwargs: dict[str, Any],
    ) -> tuple[Tensor, Tensor]:
        """The conditional and unconditional teacher calls as one call of batch 2B."""
        what = "guidance_batching='batched' needs"
        if kwargs.keys() != neg_kwargs.keys():
            raise ValueError(
                f"{what} the same keyword arguments in both teacher calls, got "
                f"{sorted(kwargs)} and {sorted(neg_kwargs)}"
            )
        if ehs is None or ehs.shape[1:] != neg_ehs.shape[1:]:
            shape = None if ehs is None else tuple(ehs.shape)
            raise ValueError(
                f"{what} encoder_hidden_states and negative_encoder_hidden_states of one shape, "
                f"got {shape} and {tuple(neg_ehs.shape)}"
            )
        n = x_t.shape[0]
        both = {}
        for key, value in kwargs.items():
            other = neg_kwargs[key]
            if _is_per_sample(value, n):
                both[key] = torch.cat([value, other])
            elif value is other:
                both[key] = value
            else:
                raise ValueError(
                    f"{what} every keyword argument to be batch-shaped or shared by both calls; "
                    f"{key!r} differs"
                )
        raw = self._call(
            self.teacher,
            "teacher",
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            torch.cat([ehs, neg_ehs]),
            both,
        )
        return raw[:n], raw[n:]

    # --- the student's input ------------------------------------------------------------

    def _rung_index_mask(self, k: Tensor, j: int, like: Tensor) -> Tensor:
        return (k == j).reshape(-1, *([1] * (like.ndim - 1)))

    def _student_input(
        self, latents: Tensor, noise: Tensor, ehs: Tensor | None, model_kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        n = latents.shape[0]
        wide = compute_dtype(noise.device)
        if self._steps == 1:
            t_s = torch.full((n,), self._max_t, device=noise.device, dtype=torch.float32)
            return round_once(widen(noise, wide) * self._max_t, noise.dtype), t_s
        stratified = self.config.rung_sampling == "stratified"
        if stratified:
            order, sorted_k, position = self._stratified_rungs(n, noise.device)
            k = sorted_k.index_select(0, position)
            t_s = rungs_at(k, self._t_list, dtype=torch.float32)
        else:
            t_s, k = sample_from_t_list(
                n, self._t_list, device=noise.device, dtype=torch.float32, return_index=True
            )
        if not self.config.backward_simulation:
            return add_noise(latents, noise, t_s), t_s
        pure = round_once(widen(noise, wide) * self._t_list[0], noise.dtype)
        with torch.no_grad():
            if stratified:
                x0_sorted = self._unroll_stratified(noise, ehs, model_kwargs, order, sorted_k)
                x0_at_k = x0_sorted.index_select(0, position)
            else:
                x0_at_k = self._unroll(noise, k, ehs, model_kwargs)
            x_s = torch.where(
                self._rung_index_mask(k, 0, noise), pure, add_noise(x0_at_k, noise, t_s)
            )
        return x_s, t_s

    def _next_state(self, x0_hat: Tensor, x: Tensor, t_j: Tensor, t_next: float) -> Tensor:
        """The unrolled student's sample re-noised at the next rung: with the noise that ``x``
        implies (``ode``) or with fresh noise (``sde``)."""
        if self.config.student_sample_type == "ode":
            step_noise = x0_to_eps(x0_hat, x, t_j)
        else:
            step_noise = torch.randn_like(x0_hat)
        return add_noise(x0_hat, step_noise, torch.full_like(t_j, t_next))

    def _unroll(
        self, noise: Tensor, k: Tensor, ehs: Tensor | None, model_kwargs: dict[str, Any]
    ) -> Tensor:
        """Each sample's x0 after its k-th student call (zeros at rung 0): every call on the
        whole batch, from fresh noise (the student's own sample, independent of ``noise``)."""
        n, ladder, wide = noise.shape[0], self._t_list, compute_dtype(noise.device)
        x = round_once(torch.randn_like(noise, dtype=wide) * ladder[0], noise.dtype)
        x0_at_k = torch.zeros_like(noise)
        for j in range(self._steps - 1):
            t_j = torch.full((n,), ladder[j], device=noise.device, dtype=torch.float32)
            x0_hat = self._student_x0(x, t_j, ehs, model_kwargs)
            x0_at_k = torch.where(self._rung_index_mask(k, j + 1, noise), x0_hat, x0_at_k)
            if j + 1 < self._steps - 1:
                x = self._next_state(x0_hat, x, t_j, ladder[j + 1])
        return x0_at_k

    def _stratified_rungs(self, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``rung_sampling="stratified"``: a random order of the samples, the rung at each
        position (non-increasing), and each sample's position in the order.

        Position i holds rung K-1 - (K i + r) // n with r ~ U{0..K-1}: every sample's rung is
        uniform, the groups' sizes differ by at most one, and at most
        ceil((K-1-j) n / K) positions hold a rung above j (a size fixed by n).
        """
        steps = self._steps
        order = torch.randperm(n, device=device)
        offset = torch.randint(0, steps, (), device=device)
        sorted_k = (steps - 1) - (steps * torch.arange(n, device=device) + offset) // n
        position = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=device))
        return order, sorted_k, position

    def _unroll_stratified(
        self,
        noise: Tensor,
        ehs: Tensor | None,
        model_kwargs: dict[str, Any],
        order: Tensor,
        sorted_k: Tensor,
    ) -> Tensor:
        """:meth:`_unroll` in the stratified order: call j + 1 runs only on the first
        ceil((K-1-j) n / K) positions, the ones whose rung can be above j. Returns x0 by
        position."""
        n, steps, ladder, device = noise.shape[0], self._steps, self._t_list, noise.device
        rows = [((steps - 1 - j) * n + steps - 1) // steps for j in range(steps - 1)]
        take = order[: rows[0]]
        ehs_sorted = None if ehs is None else ehs.index_select(0, take)
        kwargs_sorted, gathered = _gather_per_sample(model_kwargs, take, n)
        wide = compute_dtype(device)
        x = torch.randn((rows[0], *noise.shape[1:]), device=device, dtype=wide) * ladder[0]
        x = round_once(x, noise.dtype)  # fresh noise: the student's own samples
        x0_sorted = torch.zeros_like(noise)
        for j in range(steps - 1):
            m = rows[j]
            x = x[:m]
            t_j = torch.full((m,), ladder[j], device=device, dtype=torch.float32)
            kwargs_j = {
                key: value[:m] if key in gathered else value for key, value in kwargs_sorted.items()
            }
            cond = None if ehs_sorted is None else ehs_sorted[:m]
            x0_hat = self._student_x0(x, t_j, cond, kwargs_j)
            keep = self._rung_index_mask(sorted_k[:m], j + 1, x0_hat)
            x0_sorted = torch.cat([torch.where(keep, x0_hat, x0_sorted[:m]), x0_sorted[m:]])
            if j + 1 < steps - 1:
                x = self._next_state(x0_hat, x, t_j, ladder[j + 1])
        return x0_sorted

    # --- checks (shapes and types: static, so they cost nothing under compile) --------------

    def _check_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        for name in _RESERVED:
            if name in model_kwargs:
                raise TypeError(f"{name} is set by the pipeline; do not pass it in **model_kwargs")

    def _logits_without_weight_grads(self, features: list[Tensor]) -> Tensor:
        """Discriminator logits whose gradient reaches the features but not its weights."""
        disc = self.discriminator
        if self._disc_sharded:
            # FSDP2 re-binds its parameters in its own hooks: the caller keeps them frozen
            # (requires_grad_(False)) around the student update.
            return disc(features)
        inner = disc.module if isinstance(disc, nn.parallel.DistributedDataParallel) else disc
        params = {name: p.detach() for name, p in inner.named_parameters()}
        return torch.func.functional_call(inner, params, (features,))

    # --- the losses -----------------------------------------------------------------------

    def compute_student_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        *,
        negative_encoder_hidden_states: Tensor | None = None,
        negative_encoder_hidden_states_mask: Tensor | None = None,
        guidance_scale: float | None = None,
        negative_model_kwargs: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        r"""The student's loss: VSD against the (guided) teacher, plus the GAN term.

        Gradients reach the student only (through its x0 and, with the GAN branch, through the
        teacher's features into the discriminator's logits; teacher and discriminator weights
        receive none as long as they do not require grad).

        Args:
            latents: Real latents ``x0`` ``[B, ...]`` (used by multi-step students).
            noise: Gaussian noise, same shape: the student's input noise.
            encoder_hidden_states: Conditioning for every network.
            negative_encoder_hidden_states: Conditioning of the unconditional teacher call;
                required when guidance is on.
            negative_encoder_hidden_states_mask: Replaces ``encoder_hidden_states_mask`` in the
                unconditional call (otherwise that key is dropped there, as is
                ``txt_seq_lens``, which describe the positive prompt).
            guidance_scale: Overrides ``config.guidance_scale`` for this call.
            negative_model_kwargs: Keyword arguments that replace ``model_kwargs`` entries in the
                unconditional call (for example negative ``pooled_projections``).
            **model_kwargs: Passed to every network call.

        Returns:
            ``{"vsd", "total"}`` (+ ``"gan_gen"``, in the logits' dtype), 0-d tensors in
            ``latents``' dtype.

        Raises:
            ValueError: Guidance on without negative conditioning; mismatched shapes.
            TypeError: A network returned no tensor; a reserved keyword in ``model_kwargs``.
        """
        check_pair("latents", latents, "noise", noise)
        self._check_kwargs(model_kwargs)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if scale is not None:
            check_scale("guidance_scale", scale)
            if negative_encoder_hidden_states is None:
                raise ValueError(
                    f"guidance_scale = {scale} needs negative_encoder_hidden_states (the "
                    "unconditional teacher call's conditioning)"
                )
        ehs = encoder_hidden_states
        x_s, t_s = self._student_input(latents, noise, ehs, model_kwargs)
        gen = self._student_x0(x_s, t_s, ehs, model_kwargs)

        t = self.sample_timesteps(latents.shape[0], device=latents.device)
        eps = torch.randn_like(latents)
        # The GAN term differentiates through the teacher's features of x_t; VSD does not.
        x_t = add_noise(gen if self._gan else gen.detach(), eps, t)
        # One copy of x_t in the compute dtype (float64 by default): the fake score's and the
        # teacher's x0 (and CFG) stay unrounded.
        x_t_wide = widen(x_t.detach(), compute_dtype(x_t.device))
        with torch.no_grad():
            fake_x0 = self._x0(
                self._call(self.fake_score, "fake_score", x_t, t, ehs, model_kwargs), x_t_wide, t
            )
        if scale is not None:
            neg_kwargs = dict(model_kwargs)
            neg_kwargs.pop("txt_seq_lens", None)
            neg_kwargs.pop("encoder_hidden_states_mask", None)
            if negative_encoder_hidden_states_mask is not None:
                neg_kwargs["encoder_hidden_states_mask"] = negative_encoder_hidden_states_mask
            neg_kwargs.update(negative_model_kwargs or {})
            self._check_kwargs(neg_kwargs)
        batched = scale is not None and self.config.guidance_batching == "batched"
        features = None
        if self._gan:
            raw, features = self._capture.run(
                lambda: self._call(self.teacher, "teacher", x_t, t, ehs, model_kwargs)
            )
            teacher_x0 = self._x0(raw.detach(), x_t_wide, t)
        elif batched:
            with torch.no_grad():
                raw, raw_uncond = self._batched_teacher(
                    x_t, t, ehs, negative_encoder_hidden_states, model_kwargs, neg_kwargs
                )
                teacher_x0 = self._x0(raw, x_t_wide, t)
                uncond = self._x0(raw_uncond, x_t_wide, t)
        else:
            with torch.no_grad():
                raw = self._call(self.teacher, "teacher", x_t, t, ehs, model_kwargs)
                teacher_x0 = self._x0(raw, x_t_wide, t)
        if scale is not None:
            if not batched:
                with torch.no_grad():
                    raw_uncond = self._call(
                        self.teacher,
                        "teacher",
                        x_t.detach(),
                        t,
                        negative_encoder_hidden_states,
                        neg_kwargs,
                    )
                    uncond = self._x0(raw_uncond, x_t_wide, t)
            teacher_x0 = classifier_free_guidance(teacher_x0, uncond, scale)
        vsd = vsd_loss(gen, teacher_x0, fake_x0)
        if not self._gan:
            return {"vsd": vsd, "total": vsd}
        gan_gen = gan_gen_loss(self._logits_without_weight_grads(features))
        wide = compute_dtype(vsd.device)
        total = round_once(
            widen(vsd, wide) + self.config.gan_loss_weight_gen * widen(gan_gen, wide), vsd.dtype
        )
        return {"vsd": vsd, "gan_gen": gan_gen, "total": total}

    def compute_fake_score_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        """The fake score's denoising loss on (detached) student samples.

        The fake score's raw output (in ``pred_type``) is converted to ``fake_score_pred_type``
        and regressed on that parameterization's target. Gradients reach the fake score only.

        Args:
            latents: Real latents ``[B, ...]`` (used by multi-step students).
            noise: Gaussian noise, same shape: the student's input noise.
            encoder_hidden_states: Conditioning for every network.
            **model_kwargs: Passed to every network call.

        Returns:
            ``{"fake_score", "total"}``, 0-d tensors in ``latents``' dtype.
        """
        check_pair("latents", latents, "noise", noise)
        self._check_kwargs(model_kwargs)
        ehs = encoder_hidden_states
        with torch.no_grad():
            x_s, t_s = self._student_input(latents, noise, ehs, model_kwargs)
            gen = self._student_x0(x_s, t_s, ehs, model_kwargs)
            t = self.sample_timesteps(latents.shape[0], device=latents.device)
            eps = torch.randn_like(latents)
            x_t = add_noise(gen, eps, t)
        raw = self._call(self.fake_score, "fake_score", x_t, t, ehs, model_kwargs)
        pred = convert_prediction(raw, x_t, t, src=self._pred, dst=self._fake_pred)
        loss = dsm_loss(pred, x0=gen, eps=eps, t=t, pred_type=self._fake_pred)
        return {"fake_score": loss, "total": loss}

    def compute_discriminator_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        r"""The discriminator's loss on teacher features of noised fake and real samples.

        .. math::

            \mathcal{L}_D = \text{softplus}(D(\phi(x_t^{\text{fake}}))) +
            \text{softplus}(-D(\phi(x_t^{\text{real}}))) + \lambda_{R1}\,
            \text{mean}\big((D(\phi(x_t^{\text{real}})) - D(\phi(x_0 + \alpha z)))^2\big)

        Real latents are noised with the fake branch's ``t`` and noise when
        ``gan_use_same_t_noise``, with fresh draws otherwise. The R1 branch (FastGen's
        approximate R1) feeds ``latents + alpha * z`` to the teacher at the real branch's ``t``.
        Gradients reach the discriminator only.

        Returns:
            ``{"gan_disc", "total"}`` (+ ``"r1"``), 0-d tensors in the logits' dtype.

        Raises:
            ValueError: No discriminator was given to the pipeline.
        """
        if self.discriminator is None:
            raise ValueError(
                "compute_discriminator_loss needs a discriminator: DMDPipeline(..., "
                "discriminator=D) with a feature capture on the teacher"
            )
        check_pair("latents", latents, "noise", noise)
        self._check_kwargs(model_kwargs)
        ehs = encoder_hidden_states
        n = latents.shape[0]

        def features(x_t: Tensor, t: Tensor) -> list[Tensor]:
            _, feats = self._capture.run(
                lambda: self._call(self.teacher, "teacher", x_t, t, ehs, model_kwargs)
            )
            return feats

        with torch.no_grad():
            x_s, t_s = self._student_input(latents, noise, ehs, model_kwargs)
            gen = self._student_x0(x_s, t_s, ehs, model_kwargs)
            t = self.sample_timesteps(n, device=latents.device)
            eps = torch.randn_like(latents)
            fake_feats = features(add_noise(gen, eps, t), t)
            if self.config.gan_use_same_t_noise:
                t_real, eps_real = t, eps
            else:
                t_real = self.sample_timesteps(n, device=latents.device)
                eps_real = torch.randn_like(latents)
            real_feats = features(add_noise(latents, eps_real, t_real), t_real)
        real_logits = self.discriminator(real_feats)
        disc = gan_disc_loss(real_logits, self.discriminator(fake_feats))
        if self.config.gan_r1_reg_weight <= 0:
            return {"gan_disc": disc, "total": disc}
        with torch.no_grad():
            z = torch.randn_like(latents)
            wide = compute_dtype(latents.device)
            perturbed = round_once(
                widen(latents, wide) + self.config.gan_r1_reg_alpha * widen(z, wide), latents.dtype
            )
            perturbed_feats = features(perturbed, t_real)
        r1 = r1_loss(real_logits, self.discriminator(perturbed_feats))
        wide = compute_dtype(disc.device)
        total = round_once(
            widen(disc, wide) + self.config.gan_r1_reg_weight * widen(r1, wide), disc.dtype
        )
        return {"gan_disc": disc, "r1": r1, "total": total}

    # --- EMA ------------------------------------------------------------------------------

    def update_ema(self, *, iteration: int | None = None) -> None:
        """Fold the student's weights into its EMA (no-op without ``config.ema``).

        Args:
            iteration: The update's number; by default an internal counter (1, 2, ...).
        """
        if self._ema is None:
            return
        self._iteration = self._iteration + 1 if iteration is None else iteration
        self._ema.update(self.student, iteration=self._iteration)

    # --- state (checkpoints) --------------------------------------------------------------

    def networks(self) -> dict[str, nn.Module]:
        """The networks the pipeline trains, by name: ``student``, ``fake_score`` and, when
        set, ``discriminator`` (the teacher is frozen and not among them)."""
        nets = {"student": self.student, "fake_score": self.fake_score}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        return nets

    def state_dict(self) -> dict[str, Any]:
        """Everything the pipeline trains, as one nested dict (the teacher is not in it: it is
        the pretrained weights, reloaded from them).

        ``{"student", "fake_score", ["discriminator"], ["ema", "ema_initialized"],
        "iteration"}``: each network's parameters and persistent buffers by name (wrappers
        looked through; FSDP2 parameters as their DTensors), the EMA shadows
        (:meth:`ExponentialMovingAverage.sharded_state_dict`) and the EMA update counter. The
        tensors are the live ones, not copies: ``torch.distributed.checkpoint`` can load into
        them in place.
        """
        state: dict[str, Any] = {name: network_state(net) for name, net in self.networks().items()}
        if self._ema is not None:
            state["ema"] = self._ema.sharded_state_dict()
            state["ema_initialized"] = self._ema.initialized
        state["iteration"] = self._iteration
        return state

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`state_dict`'s output. Everything is checked before anything is written.

        Args:
            state: A dict from :meth:`state_dict` (of this pipeline or one built alike).
            strict: Every network's keys must match exactly (otherwise missing and unexpected
                keys are skipped); shapes must match either way.

        Raises:
            CheckpointError: A network's keys or shapes do not match (the message names the
                network and the key), or the state holds a discriminator or an EMA the pipeline
                lacks, or lacks one it has.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        nets = self.networks()
        for name, has in (("discriminator", self.discriminator), ("ema", self._ema)):
            if name in state and has is None:
                raise CheckpointError(
                    f"the state holds a {name} but this pipeline has none "
                    f"({'discriminator=' if name == 'discriminator' else 'config.ema'} not set)"
                )
            if name not in state and has is not None:
                raise CheckpointError(f"this pipeline has a {name} but the state holds none")
        known = {*nets, "iteration", *(("ema", "ema_initialized") if self._ema else ())}
        unknown = sorted(set(state) - known)
        if unknown:
            raise CheckpointError(f"unexpected sections {unknown} in the pipeline state")
        for name in nets:
            if name not in state:
                raise CheckpointError(f"the state holds no {name}")
        for name, net in nets.items():
            check_state(name, network_state(net), state[name], strict=strict)
        if self._ema is not None:
            check_state("ema", self._ema.sharded_state_dict(), state["ema"], strict=True)
        for name, net in nets.items():
            load_network_state(net, state[name], strict=strict)
        if self._ema is not None:
            self._ema.load_state_dict(
                state["ema"], initialized=bool(state.get("ema_initialized", True))
            )
        self._iteration = int(state.get("iteration", 0))
