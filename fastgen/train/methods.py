"""The consistency family in the trainer: sCM, rCM or MeanFlow with its EMA, seen the way the
trainer and the checkpoints see :class:`~fastgen.DMDPipeline` (its trained networks, its
losses by network, its EMA, its state).

Per iteration the trainer makes, for rCM, ``config.dmd.student_update_freq`` fake-score updates
and one student update; for sCM and MeanFlow one student update (sCM's adaptive weighting
trains with the student's loss, under its own optimizer).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fastgen.consistency.config import MeanFlowConfig, RCMConfig, SCMConfig
from fastgen.consistency.meanflow import MeanFlowPipeline
from fastgen.consistency.rcm import RCMPipeline
from fastgen.consistency.scm import AdaptiveWeight, SCMPipeline
from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.ema import ExponentialMovingAverage
from fastgen.dmd.state import load_pipeline_state, pipeline_state

__all__ = ["ConsistencyPipeline"]


class ConsistencyPipeline:
    """sCM, rCM or MeanFlow around the trainer's networks, with the student's EMA.

    Args:
        student: The student (for MeanFlow one that takes ``r``: :class:`~fastgen.consistency.MeanFlowNet`).
        teacher: The pretrained flow model (frozen).
        config: The method's config; its ``ema`` makes the EMA.
        fake_score: rCM's DMD2 fake score (required for rCM, refused otherwise).
        weight_net: sCM's and rCM's adaptive weighting (default: a new :class:`AdaptiveWeight`
            on the student's device).
        call: How the networks are called.

    Raises:
        TypeError: ``config`` is no consistency config.
        ValueError: A fake score missing for rCM or given to another method.
    """

    discriminator = None  # no GAN branch in the consistency family

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        config: SCMConfig | MeanFlowConfig,
        *,
        fake_score: nn.Module | None = None,
        weight_net: nn.Module | None = None,
        call: NetworkCall | None = None,
    ) -> None:
        if not isinstance(config, (SCMConfig, MeanFlowConfig)):
            raise TypeError(
                f"config must be an SCMConfig, RCMConfig or MeanFlowConfig, got {type(config).__name__}"
            )
        rcm = isinstance(config, RCMConfig)
        if rcm != (fake_score is not None):
            raise ValueError(
                "rCM needs fake_score= (its DMD2 term); sCM and MeanFlow take none"
                if rcm
                else f"fake_score= is rCM's; {type(config).__name__} takes none"
            )
        self.config = config
        self.teacher = teacher
        self.student = student
        self.fake_score = fake_score
        self.weight_net = None
        if isinstance(config, SCMConfig):
            if weight_net is None:
                device = next(student.parameters()).device
                weight_net = AdaptiveWeight().to(device)
            self.weight_net = weight_net
        if rcm:
            self._pipe = RCMPipeline(student, teacher, fake_score, config, weight_net=weight_net,
                                     call=call)  # fmt: skip
            self.call = self._pipe.scm.call
        elif isinstance(config, SCMConfig):
            self._pipe = SCMPipeline(student, config, teacher=teacher, weight_net=weight_net,
                                     call=call)  # fmt: skip
            self.call = self._pipe.call
        else:
            self._pipe = MeanFlowPipeline(student, config, teacher=teacher, call=call)
            self.call = self._pipe.call
        self._ema = ExponentialMovingAverage(student, config.ema) if config.ema else None
        self._iteration = 0

    @property
    def ema(self) -> ExponentialMovingAverage | None:
        """The student's EMA (None without ``config.ema``)."""
        return self._ema

    def compute_student_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        *,
        iteration: int | Tensor = 0,
        negative_encoder_hidden_states: Tensor | None = None,
        negative_model_kwargs: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        """The method's student loss (sCM's and rCM's train the adaptive weighting too)."""
        if isinstance(self._pipe, RCMPipeline):
            loss = self._pipe.compute_student_loss
        else:
            loss = self._pipe.compute_loss
        return loss(latents, noise, encoder_hidden_states, iteration=iteration,
                    negative_encoder_hidden_states=negative_encoder_hidden_states,
                    negative_model_kwargs=negative_model_kwargs, **model_kwargs)  # fmt: skip

    def compute_fake_score_loss(
        self,
        latents: Tensor,
        noise: Tensor,
        encoder_hidden_states: Tensor | None = None,
        **model_kwargs: Any,
    ) -> dict[str, Tensor]:
        """rCM's fake-score loss (DMD2's, on the student's one-step samples)."""
        if not isinstance(self._pipe, RCMPipeline):
            raise ValueError(f"{type(self.config).__name__} has no fake score")
        return self._pipe.compute_fake_score_loss(latents, noise, encoder_hidden_states,
                                                  **model_kwargs)  # fmt: skip

    @property
    def fake_score_updates(self) -> int:
        """Fake-score updates per iteration (rCM: its DMD2 term's ``student_update_freq``)."""
        return self.config.dmd.student_update_freq if isinstance(self.config, RCMConfig) else 0

    def update_ema(self, *, iteration: int | None = None) -> None:
        """Fold the student's weights into its EMA (no-op without ``config.ema``)."""
        if self._ema is None:
            return
        self._iteration = self._iteration + 1 if iteration is None else iteration
        self._ema.update(self.student, iteration=self._iteration)

    def networks(self) -> dict[str, nn.Module]:
        """The trained networks: ``student`` and, by method, ``weight_net`` and ``fake_score``."""
        nets = {"student": self.student}
        if self.weight_net is not None:
            nets["weight_net"] = self.weight_net
        if self.fake_score is not None:
            nets["fake_score"] = self.fake_score
        return nets

    def state_dict(self) -> dict[str, Any]:
        """Every trained network's state, the EMA and its counter (live tensors, for DCP)."""
        return pipeline_state(self.networks(), self._ema, self._iteration)

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`state_dict`'s output, everything checked before anything is written."""
        self._iteration = load_pipeline_state(self.networks(), self._ema, state, strict=strict)

    def to_yaml(self) -> str:
        """The method's config as a recipe (``method:`` first)."""
        import json

        import yaml

        from fastgen.train.recipes import method_of

        fields = {"method": method_of(self.config), **json.loads(self.config.model_dump_json())}
        return yaml.safe_dump(fields, sort_keys=False)
