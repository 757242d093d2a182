r"""rCM: sCM distillation regularized by DMD2's distribution-matching (score) term.

.. math::

    \mathcal{L}_{\text{student}} = \mathcal{L}_{\text{sCM}} + \lambda\,
    \text{vsd}\big(g,\ \text{cfg}(\hat x_0^{\text{teacher}}),\ \hat x_0^{\text{fake}}\big)

with :math:`g` the consistency model's one-step sample from noise and the fake score trained
alternately on it (:meth:`RCMPipeline.compute_fake_score_loss`). The two terms are
:class:`~fastgen.consistency.SCMPipeline`'s and :class:`fastgen.DMDPipeline`'s own losses, on
the same student and teacher.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fastgen.consistency.config import RCMConfig
from fastgen.consistency.scm import SCMPipeline
from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.pipeline import DMDPipeline
from fastgen.precision import compute_once

__all__ = ["RCMPipeline"]


class RCMPipeline:
    """rCM's two losses: the student's (sCM + weighted DMD2 term) and the fake score's.

    Args:
        student: The consistency model being trained (a rectified-flow network).
        teacher: The pretrained flow model; frozen here.
        fake_score: The DMD2 fake score (:func:`fastgen.create_fake_score`).
        config: The hyperparameters (``config.dmd`` for the DMD2 term).
        weight_net: sCM's adaptive weighting, or None.
        call: How the networks are called.

    Raises:
        TypeError: A network is not an ``nn.Module``; ``config`` is not an ``RCMConfig``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(5, 4)
        ...     def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        ...         return self.lin(torch.cat([hidden_states, timestep[:, None]], 1))
        >>> pipe = RCMPipeline(Net(), Net(), Net(), RCMConfig())
        >>> sorted(pipe.compute_student_loss(torch.randn(8, 4), torch.randn(8, 4)))
        ['logvar', 'scm', 'total', 'unweighted', 'vsd']
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        fake_score: nn.Module,
        config: RCMConfig,
        *,
        weight_net: nn.Module | None = None,
        call: NetworkCall | None = None,
    ) -> None:
        if not isinstance(config, RCMConfig):
            raise TypeError(f"config must be an RCMConfig, got {type(config).__name__}")
        self.config = config
        self.scm = SCMPipeline(student, config, teacher=teacher, weight_net=weight_net, call=call)
        self.dmd = DMDPipeline(student, teacher, fake_score, config.dmd, call=call)

    @property
    def student(self) -> nn.Module:
        return self.scm.student

    @property
    def fake_score(self) -> nn.Module:
        return self.dmd.fake_score

    def compute_student_loss(
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
        r"""The student's loss, :math:`\mathcal L_{\text{sCM}} + \lambda\, \text{vsd}`.

        ``noise`` serves both terms: sCM noises ``latents`` with it, DMD2's one-step sample
        starts from it. ``guidance_scale`` overrides the teacher's guidance of both terms.

        Returns:
            ``{"scm", "vsd", "total"}`` and the sCM monitors ``"unweighted"``, ``"logvar"``,
            0-d tensors in ``latents``' dtype.
        """
        neg = negative_encoder_hidden_states
        scm = self.scm.compute_loss(
            latents, noise, encoder_hidden_states, t=t, negative_encoder_hidden_states=neg,
            negative_model_kwargs=negative_model_kwargs, guidance_scale=guidance_scale,
            iteration=iteration, **model_kwargs,
        )  # fmt: skip
        dmd = self.dmd.compute_student_loss(
            latents, noise, encoder_hidden_states, negative_encoder_hidden_states=neg,
            negative_model_kwargs=negative_model_kwargs, guidance_scale=guidance_scale,
            **model_kwargs,
        )  # fmt: skip
        weight = self.config.dmd_weight
        total = compute_once(
            lambda s, v: s + weight * v, scm["scm"], dmd["vsd"], dtype=latents.dtype
        )
        return {**scm, "vsd": dmd["vsd"], "total": total}

    def compute_fake_score_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        """The fake score's denoising loss on the student's one-step samples
        (:meth:`fastgen.DMDPipeline.compute_fake_score_loss`)."""
        return self.dmd.compute_fake_score_loss(
            latents, noise, encoder_hidden_states, **model_kwargs
        )
