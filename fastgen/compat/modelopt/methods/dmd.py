"""``modelopt.torch.fastgen.methods.dmd``: :class:`fastgen.DMDPipeline` with modelopt's checks.

The three losses, the student's input, EMA and state are fastgen's. What modelopt adds:

- every network call goes through ``_call_model(model, hidden_states, timestep,
  encoder_hidden_states=None, **model_kwargs)``, modelopt's extension point for model families
  (a subclass overrides it, as modelopt's Qwen-Image plugin does); ``_raw_to_x0`` and
  ``_build_student_input`` are there too, under modelopt's names;
- wiring mistakes are reported as modelopt reports them: a GAN loss without a feature capture
  on the teacher raises ``RuntimeError`` when it runs (fastgen raises ``ValueError`` at
  construction), and so does ``compute_discriminator_loss`` without a discriminator.
"""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401 (modelopt's module exposes torch; code patches dmd.torch.randn_like)
from torch import Tensor, nn

from fastgen.compat.modelopt.pipeline import DistillationPipeline
from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.pipeline import DMDPipeline as _DMDPipeline
from fastgen.flow_matching import convert_prediction
from fastgen.losses import (  # noqa: F401 (modelopt's namespace: code patches the losses here)
    dsm_loss,
    gan_disc_loss,
    gan_gen_loss,
    r1_loss,
    vsd_loss,
)
from fastgen.pred_type import PRED_TYPES, flow_name

__all__ = ["DMDPipeline"]


class _ModelCall(NetworkCall):
    """Every network call through the pipeline's ``_call_model`` (which scales the timestep)."""

    def __init__(self, pipeline: DMDPipeline) -> None:
        super().__init__(num_train_timesteps=None)
        self.pipeline = pipeline

    def forward(self, model, role, x_t, timestep, encoder_hidden_states, model_kwargs) -> Tensor:
        return self.pipeline._call_model(
            model, x_t, timestep, encoder_hidden_states, **model_kwargs
        )


class DMDPipeline(_DMDPipeline, DistillationPipeline):
    """:class:`fastgen.DMDPipeline` under modelopt's signature and exception types; a
    :class:`~fastgen.compat.modelopt.pipeline.DistillationPipeline`, as modelopt's is (fastgen's
    ``device``, ``dtype`` and ``sample_timesteps`` come first).

    Args:
        student, teacher, fake_score, config, discriminator: As in modelopt.
        call: How the networks are called (fastgen's :class:`~fastgen.dmd.calls.NetworkCall`).

    Raises:
        ValueError: ``gan_loss_weight_gen > 0`` without a discriminator (at construction).
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
        super().__init__(
            student, teacher, fake_score, config, discriminator=discriminator, call=call
        )
        self._network_call, self.call = self.call, _ModelCall(self)

    def _call_model(
        self,
        model: nn.Module,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Call ``model`` on ``(hidden_states, t)``: its raw prediction (fastgen's
        :class:`~fastgen.dmd.calls.NetworkCall`: ``t * num_train_timesteps`` when set, diffusers'
        keywords, a tensor, tuple or ``.sample`` back). Override it for other signatures."""
        call = self._network_call
        timestep = call.timestep(timestep, hidden_states)
        return call.forward(
            model, "model", hidden_states, timestep, encoder_hidden_states, model_kwargs
        )

    @staticmethod
    def _raw_to_x0(raw: Tensor, x_t: Tensor, t: Tensor, *, native_pred_type: str) -> Tensor:
        """x0 from a raw prediction in ``native_pred_type`` (:func:`fastgen.convert_prediction`)."""
        if native_pred_type not in PRED_TYPES:
            raise ValueError(
                f"native_pred_type must be one of {PRED_TYPES}, got {native_pred_type!r}"
            )
        return convert_prediction(raw, x_t, t, src=flow_name(native_pred_type), dst="x0")

    def _build_student_input(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """``(input_student, t_student)``: :meth:`fastgen.DMDPipeline.student_input`."""
        return self.student_input(latents, noise, encoder_hidden_states, **model_kwargs)

    def _check_capture(self) -> None:
        """modelopt checks for the teacher's feature capture when a GAN loss runs."""

    def _require_capture(self, branch: str) -> None:
        if self.capture is None:
            raise RuntimeError(
                f"feature-capture hooks are required on the teacher ({branch} branch): call "
                "modelopt.torch.fastgen.plugins.qwen_image.attach_feature_capture(teacher, ...) "
                "(fastgen.dmd.attach_feature_capture) before running this loss"
            )

    def distribution_matching_loss(
        self, gen: Tensor, teacher_x0: Tensor, fake_x0: Tensor
    ) -> Tensor:
        """:func:`fastgen.vsd_loss`, looked up in this module when it runs, as modelopt's pipeline
        looks up ``methods.dmd.vsd_loss`` (so a patch of that name sees the call)."""
        return vsd_loss(gen, teacher_x0, fake_x0)

    def compute_student_loss(self, latents: Tensor, noise: Tensor, *args, **kwargs: Any):
        """:meth:`fastgen.DMDPipeline.compute_student_loss`.

        Raises:
            RuntimeError: The GAN branch is on and the teacher has no feature capture.
        """
        if self._gan:
            self._require_capture("student GAN")
        return super().compute_student_loss(latents, noise, *args, **kwargs)

    def compute_discriminator_loss(self, latents: Tensor, noise: Tensor, *args, **kwargs: Any):
        """:meth:`fastgen.DMDPipeline.compute_discriminator_loss`.

        Raises:
            RuntimeError: No discriminator, or no feature capture on the teacher.
        """
        if self.discriminator is None:
            raise RuntimeError(
                "compute_discriminator_loss requires a discriminator to be set on DMDPipeline"
            )
        self._require_capture("discriminator")
        return super().compute_discriminator_loss(latents, noise, *args, **kwargs)
