r"""The DMD2 training step as three loss calls: student, fake score, discriminator.

:class:`DMDPipeline` holds the networks and the config; the caller owns optimizers, the 5:1
alternation and the loop. Every ``compute_*`` is one ``torch.compile(fullgraph=True)`` frame
with the user's networks inside: no host sync, no Python branch on tensor values, and the same
sequence of network calls on every rank (so FSDP's collectives line up without a broadcast).

Each loss opens the same way (:meth:`DMDPipeline.generate`): the student's input
(:mod:`fastgen.dmd.student_input`), its x0 :math:`g = \hat x_0^{\text{student}}(x_s, t_s)`,
then :math:`t \sim` ``sample_t_cfg`` and fresh noise :math:`\epsilon'`. The student's loss is

.. math::

    \mathcal{L}_{\text{student}} = \text{vsd}\big(g,\ \text{cfg}(\hat x_0^{\text{teacher}}),\
    \hat x_0^{\text{fake}}\big) + \lambda_{\text{gan}}\, \text{softplus}(-D(\phi(x_t)))

with :math:`x_t = \text{add\_noise}(g, \epsilon', t)`. Teacher and fake-score x0 and the
guidance are computed in float64 (float32 under that precision policy) and enter the VSD loss
unrounded; every loss is rounded once to the latents' dtype. How a network is called (keywords,
timestep scale, output unwrapping) lives in :mod:`fastgen.dmd.calls`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastgen.checks import check_pair
from fastgen.dmd.calls import NetworkCall, batched_teacher, check_kwargs, unwrap_output
from fastgen.dmd.capture import feature_capture_of
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.ema import ExponentialMovingAverage
from fastgen.dmd.factory import is_sharded
from fastgen.dmd.guidance import check_scale, classifier_free_guidance
from fastgen.dmd.state import load_pipeline_state, pipeline_state
from fastgen.dmd.student_input import StudentInput
from fastgen.flow_matching import add_noise, convert_prediction
from fastgen.losses import dsm_loss, gan_disc_loss, gan_gen_loss, r1_loss, vsd_loss
from fastgen.precision import compute_dtype, compute_once, widen
from fastgen.pred_type import flow_name
from fastgen.timesteps import sample_timesteps

__all__ = ["DMDPipeline", "unwrap_output"]


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
        call: How the networks are called (:class:`~fastgen.dmd.calls.NetworkCall`); by
            default diffusers' keywords with ``config.num_train_timesteps`` and
            ``config.timestep_dtype``. Qwen-Image's packed layout:
            :class:`fastgen.plugins.qwen_image.QwenImageCall`.

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
        call: NetworkCall | None = None,
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
        if call is not None and not isinstance(call, NetworkCall):
            raise TypeError(f"call must be a NetworkCall or None, got {type(call).__name__}")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake_score = fake_score
        self.discriminator = discriminator
        self.config = config
        self.call = call or NetworkCall(
            num_train_timesteps=config.num_train_timesteps, timestep_dtype=config.timestep_dtype
        )
        self._gan = config.gan_loss_weight_gen > 0
        self._disc_sharded = discriminator is not None and is_sharded(discriminator)
        if self._gan and discriminator is None:
            raise ValueError("gan_loss_weight_gen > 0 needs a discriminator= for DMDPipeline")
        self._check_capture()
        # Constants the hot path branches on, fixed once (static under torch.compile).
        self._pred = flow_name(config.pred_type)
        self._fake_pred = flow_name(config.fake_score_pred_type or config.pred_type)
        self._input = StudentInput(config)
        self._ema = ExponentialMovingAverage(student, config.ema) if config.ema else None
        self._iteration = 0

    def _check_capture(self) -> None:
        if self.discriminator is not None and self.capture is None:
            raise ValueError(
                "a discriminator reads teacher features: attach a capture to the teacher first, "
                "fastgen.dmd.attach_feature_capture(teacher, taps=[...])"
            )

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

    @property
    def capture(self):
        """The teacher's feature capture (:func:`~fastgen.dmd.attach_feature_capture`), or
        ``None``."""
        return feature_capture_of(self.teacher)

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

    # --- the student's sample -------------------------------------------------------------

    def _x0(self, raw: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 from a raw prediction, in ``x_t``'s dtype (``x_t`` in the compute dtype keeps it
        unrounded)."""
        return convert_prediction(raw, x_t, t, src=self._pred, dst="x0")

    def _student_x0(
        self, x_t: Tensor, t: Tensor, ehs: Tensor | None, model_kwargs: dict[str, Any]
    ) -> Tensor:
        return self._x0(self.call(self.student, "student", x_t, t, ehs, model_kwargs), x_t, t)

    def student_input(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """The student's input ``(x_s, t_s)`` for these latents and noise
        (:mod:`fastgen.dmd.student_input`; unrolls the student without grad under
        ``backward_simulation``)."""
        check_pair("latents", latents, "noise", noise)
        check_kwargs(model_kwargs)
        return self._input(latents, noise, encoder_hidden_states, model_kwargs, self._student_x0)

    def generate(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The opening of every loss: the student's x0 ``g`` from its input, a perturbation
        time ``t`` and fresh noise ``eps`` (``(g, t, eps)``). Differentiable in ``g`` unless
        run under ``torch.no_grad()``."""
        x_s, t_s = self.student_input(latents, noise, encoder_hidden_states, **model_kwargs)
        gen = self._student_x0(x_s, t_s, encoder_hidden_states, model_kwargs)
        t = self.sample_timesteps(latents.shape[0], device=latents.device)
        return gen, t, torch.randn_like(latents)

    # --- the teacher ------------------------------------------------------------------------

    def _features(self, x_t: Tensor, t: Tensor, ehs, model_kwargs) -> tuple[Tensor, list[Tensor]]:
        """The teacher's raw prediction and its tapped features for ``(x_t, t)``."""
        return self.capture.run(
            lambda: self.call(self.teacher, "teacher", x_t, t, ehs, model_kwargs)
        )

    def _guided_teacher_x0(
        self,
        x_t: Tensor,
        x_t_wide: Tensor,
        t: Tensor,
        ehs: Tensor | None,
        model_kwargs: dict[str, Any],
        scale: float | None,
        neg_ehs: Tensor | None,
        neg_kwargs: dict[str, Any],
    ) -> tuple[Tensor, list[Tensor] | None]:
        """The teacher's x0 at ``(x_t, t)`` in the compute dtype, guided when ``scale`` is set,
        and (with the GAN branch) the features of its conditional call, which keep their
        gradient to ``x_t``."""
        features = None
        batched = scale is not None and self.config.guidance_batching == "batched"
        if self._gan:
            raw, features = self._features(x_t, t, ehs, model_kwargs)
            teacher_x0 = self._x0(raw.detach(), x_t_wide, t)
        elif batched:
            with torch.no_grad():
                raw, raw_uncond = batched_teacher(
                    self.call, self.teacher, x_t, t, ehs, neg_ehs, model_kwargs, neg_kwargs
                )
                teacher_x0 = self._x0(raw, x_t_wide, t)
                uncond = self._x0(raw_uncond, x_t_wide, t)
        else:
            with torch.no_grad():
                raw = self.call(self.teacher, "teacher", x_t, t, ehs, model_kwargs)
                teacher_x0 = self._x0(raw, x_t_wide, t)
        if scale is None:
            return teacher_x0, features
        if not batched:
            with torch.no_grad():
                raw_uncond = self.call(
                    self.teacher, "teacher", x_t.detach(), t, neg_ehs, neg_kwargs
                )
                uncond = self._x0(raw_uncond, x_t_wide, t)
        return classifier_free_guidance(teacher_x0, uncond, scale), features

    def distribution_matching_loss(
        self, gen: Tensor, teacher_x0: Tensor, fake_x0: Tensor
    ) -> Tensor:
        """The student's distribution-matching term: :func:`fastgen.vsd_loss` of its x0 against
        the (guided) teacher's and the fake score's. A subclass may change the term (a
        per-sample ``additional_scale``, another weighting); it runs inside the compiled loss."""
        return vsd_loss(gen, teacher_x0, fake_x0)

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
        check_kwargs(model_kwargs)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        neg_kwargs: dict[str, Any] = {}
        if scale is not None:
            check_scale("guidance_scale", scale)
            if negative_encoder_hidden_states is None:
                raise ValueError(
                    f"guidance_scale = {scale} needs negative_encoder_hidden_states (the "
                    "unconditional teacher call's conditioning)"
                )
            neg_kwargs = dict(model_kwargs)
            neg_kwargs.pop("txt_seq_lens", None)
            neg_kwargs.pop("encoder_hidden_states_mask", None)
            if negative_encoder_hidden_states_mask is not None:
                neg_kwargs["encoder_hidden_states_mask"] = negative_encoder_hidden_states_mask
            neg_kwargs.update(negative_model_kwargs or {})
            check_kwargs(neg_kwargs)
        ehs = encoder_hidden_states
        gen, t, eps = self.generate(latents, noise, ehs, model_kwargs)
        # The GAN term differentiates through the teacher's features of x_t; VSD does not.
        x_t = add_noise(gen if self._gan else gen.detach(), eps, t)
        # One copy of x_t in the compute dtype (float64 by default): the fake score's and the
        # teacher's x0 (and CFG) stay unrounded.
        x_t_wide = widen(x_t.detach(), compute_dtype(x_t.device))
        with torch.no_grad():
            raw_fake = self.call(self.fake_score, "fake_score", x_t, t, ehs, model_kwargs)
            fake_x0 = self._x0(raw_fake, x_t_wide, t)
        teacher_x0, features = self._guided_teacher_x0(
            x_t, x_t_wide, t, ehs, model_kwargs, scale, negative_encoder_hidden_states, neg_kwargs
        )
        vsd = self.distribution_matching_loss(gen, teacher_x0, fake_x0)
        if not self._gan:
            return {"vsd": vsd, "total": vsd}
        gan_gen = gan_gen_loss(self._logits_without_weight_grads(features))
        weight = self.config.gan_loss_weight_gen
        total = compute_once(lambda v, g: v + weight * g, vsd, gan_gen, dtype=vsd.dtype)
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
        ehs = encoder_hidden_states
        with torch.no_grad():
            gen, t, eps = self.generate(latents, noise, ehs, model_kwargs)
            x_t = add_noise(gen, eps, t)
        raw = self.call(self.fake_score, "fake_score", x_t, t, ehs, model_kwargs)
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
        ehs = encoder_hidden_states
        n = latents.shape[0]

        def features(x_t: Tensor, t: Tensor) -> list[Tensor]:
            return self._features(x_t, t, ehs, model_kwargs)[1]

        with torch.no_grad():
            gen, t, eps = self.generate(latents, noise, ehs, model_kwargs)
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
            alpha = self.config.gan_r1_reg_alpha
            perturbed = compute_once(lambda x, z: x + alpha * z, latents, z, dtype=latents.dtype)
            perturbed_feats = features(perturbed, t_real)
        r1 = r1_loss(real_logits, self.discriminator(perturbed_feats))
        weight = self.config.gan_r1_reg_weight
        total = compute_once(lambda d, r: d + weight * r, disc, r1, dtype=disc.dtype)
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
        return pipeline_state(self.networks(), self._ema, self._iteration)

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
        self._iteration = load_pipeline_state(
            self.networks(), self._ema, state, strict=strict,
            optional={"discriminator": self.discriminator is not None},
        )  # fmt: skip
