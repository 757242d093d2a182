"""What the trainer shows while it trains: the teacher beside the student on the same noise,
decoded to pictures when the teacher comes from a pipeline folder, and the evaluation that
watches for collapse.

- :class:`GuidedCall`: the teacher sampled with classifier-free guidance through
  :func:`fastgen.sample` (two calls per step, guided as the DMD2 loss guides it).
- :class:`Monitor`: a fixed evaluation set (prompts x seeds, drawn once), the teacher's samples
  on it (computed once: the teacher is frozen), and per evaluation the EMA student's samples,
  their figures against the teacher's (:mod:`fastgen.eval`), the collapse alarm and the record
  of the best figures. Its state rides in the checkpoints, so a resumed run continues the same
  history. Nothing here draws from the global RNG: evaluations leave the training's random
  stream untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.dmd.calls import NetworkCall
from fastgen.dmd.guidance import classifier_free_guidance
from fastgen.eval import (
    CollapseAlarm,
    diversity_ratio,
    frechet_distance,
    knn_precision_recall,
    mean_pairwise_distance,
    vendi_score,
)
from fastgen.sampling import sample
from fastgen.timesteps import make_t_list
from fastgen.train.config import EvalConfig

__all__ = [
    "HIGHER_IS_BETTER",
    "GuidedCall",
    "Monitor",
    "encode_prompts",
    "load_decoder",
    "pipeline_folder",
    "student_ladders",
]

HIGHER_IS_BETTER = {
    "diversity": True,
    "diversity_ratio": True,
    "vendi": True,
    "recall": True,
    "precision": True,
    "psnr_to_teacher": True,
    "clip_score": True,
    "fd_to_teacher": False,
}
"""The figures an evaluation reports, and which way is better (``checkpoint.best``)."""

Batch = dict[str, Any]


class GuidedCall(NetworkCall):
    r"""A network call guided by classifier-free guidance, for sampling the teacher.

    .. math::

        \hat y = y(x_t, c) + (s - 1)\,\big(y(x_t, c) - y(x_t, \varnothing)\big)

    Args:
        inner: The network's own call.
        scale: The guidance scale ``s`` (``None`` or 1: the conditional call alone).
        negative_encoder_hidden_states: The unconditional conditioning (batch 1 or B).
        negative_kwargs: Keyword arguments that differ in the unconditional call.
    """

    def __init__(
        self,
        inner: NetworkCall,
        scale: float | None,
        negative_encoder_hidden_states: Tensor | None = None,
        negative_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=inner.num_train_timesteps,
                         timestep_dtype=inner.timestep_dtype)  # fmt: skip
        self.inner, self.scale = inner, scale
        self.negative_ehs, self.negative_kwargs = (
            negative_encoder_hidden_states,
            negative_kwargs or {},
        )

    def __call__(self, model, role, x_t, t, encoder_hidden_states, model_kwargs):
        cond = self.inner(model, role, x_t, t, encoder_hidden_states, model_kwargs)
        if self.scale is None or self.scale == 1.0:
            return cond
        b = x_t.shape[0]
        neg_ehs = self.negative_ehs
        if neg_ehs is not None:
            neg_ehs = neg_ehs.expand(b, *neg_ehs.shape[1:])
        neg = {k: v.expand(b, *v.shape[1:]) if isinstance(v, Tensor) and v.shape[0] == 1 else v
               for k, v in self.negative_kwargs.items()}  # fmt: skip
        uncond = self.inner(model, role, x_t, t, neg_ehs, {**model_kwargs, **neg})
        return classifier_free_guidance(cond, uncond, self.scale)


def pipeline_folder(teacher: Any) -> Path | None:
    """The pipeline folder the run's teacher comes from (``model_index.json`` beside its
    ``subfolder``), or ``None``."""
    if teacher is None or teacher.subfolder is None:
        return None
    folder = Path(teacher.path)
    return folder if (folder / "model_index.json").is_file() else None


def load_decoder(
    folder: str | Path, device: torch.device | str = "cpu"
) -> Callable[[Tensor], Tensor]:
    """``latents -> pictures [N, 3, H, W] in [0, 1]`` with the pipeline folder's VAE alone (no
    text encoder or transformer is loaded; :func:`fastgen.train.decode.decode`)."""
    import diffusers

    from fastgen.train.decode import decode

    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    others = {k: None for k, v in index.items() if isinstance(v, list) and k != "vae"}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **others)
    pipe.vae.to(device)
    return lambda latents: decode(pipe, latents).to(latents.device)


def encode_prompts(folder: str | Path, prompts: Sequence[str], device: torch.device | str = "cpu"
                   ) -> tuple[Batch, Batch]:  # fmt: skip
    """The prompts' conditioning and the empty prompt's (``negative``), by the pipeline folder's
    own text encoders (loaded for this, then dropped)."""
    from fastgen.train.encode import PipelineFamily, load_pipeline

    family = PipelineFamily(load_pipeline(folder), seed=0)
    cond, neg = family.conditioning(list(prompts)), family.negative("")
    move = lambda d: {k: v.to(device) if isinstance(v, Tensor) else v for k, v in d.items()}  # noqa: E731
    return move(cond), move({k[len("negative_") :]: v for k, v in neg.items()})


def student_ladders(dmd: Any) -> dict[int, list[float]]:
    """The student's own ladders: 1 step (``[t_0, 0]``) and, for a K-step student, all K; for
    a consistency model sCM's 1- and 2-step ladders (:func:`~fastgen.consistency.scm_t_list`),
    for MeanFlow one jump and two through t = 0.5."""
    from fastgen.consistency import MeanFlowConfig, SCMConfig, scm_t_list

    if isinstance(dmd, SCMConfig):
        return {n: scm_t_list(n, sigma_data=dmd.sigma_data) for n in (1, 2)}
    if isinstance(dmd, MeanFlowConfig):
        return {1: [1.0, 0.0], 2: [1.0, 0.5, 0.0]}
    t_list = list(dmd.sample_t_cfg.t_list or (dmd.sample_t_cfg.max_t, 0.0))
    ladders = {1: [t_list[0], 0.0]}
    if len(t_list) > 2:
        ladders[len(t_list) - 1] = t_list
    return ladders


def _first(value: Any, n: int) -> Any:
    return value[:n] if isinstance(value, Tensor) and value.ndim > 0 else value


def _repeat(value: Any, times: int) -> Any:
    return (
        value.repeat_interleave(times, dim=0)
        if isinstance(value, Tensor) and value.ndim > 0
        else value
    )


def _pixels(x: Tensor) -> Tensor:
    """Features of pictures (or latents) when no feature network is given: the values
    average-pooled to at most 16 x 16 and flattened."""
    if x.ndim == 5:
        x = x[:, :, 0]
    if x.ndim == 4:
        x = F.adaptive_avg_pool2d(x.float(), (min(16, x.shape[-2]), min(16, x.shape[-1])))
    return x.flatten(1).double()


class Monitor:
    """The evaluation of a run: fixed prompts x seeds, the teacher's samples, the figures.

    Args:
        config: The run's ``eval`` section.
        dmd: The run's method config (the student's sampler and ladders, prediction type,
            timestep scale, the teacher's guidance).
        batch: A batch of the data (on the training device), whose first ``config.samples``
            conditions are the evaluation's prompts unless ``conditioning`` is given.
        call: The networks' call (``None``: diffusers' standard keywords).
        decoder: ``latents -> pictures in [0, 1]`` (a pipeline's VAE), or ``None``.
        conditioning: The prompts' conditioning (``encoder_hidden_states`` and keyword
            arguments, batch P), e.g. encoded from ``config.prompts``; overrides the batch's.
        negative: The unconditional conditioning (``negative_*`` keys, batch 1 or P).
        texts: The prompts' texts (for the CLIP score), if known.
        features: ``pictures -> [N, D]`` features (CLIP's or FID's network); by default the
            pooled pixel values.
    """

    def __init__(
        self,
        config: EvalConfig,
        dmd: Any,
        batch: Batch,
        *,
        call: NetworkCall | None = None,
        decoder: Any = None,
        conditioning: Batch | None = None,
        negative: Batch | None = None,
        texts: Sequence[str] | None = None,
        features: Any = None,
        clip: Any = None,
    ) -> None:
        self.config, self.dmd = config, dmd
        self.call = call or NetworkCall(num_train_timesteps=dmd.num_train_timesteps,
                                        timestep_dtype=dmd.timestep_dtype)  # fmt: skip
        self.decoder, self.features, self.clip = decoder, features, clip
        latents = batch["latents"]
        positive = {
            k: v for k, v in batch.items() if k != "latents" and not k.startswith("negative_")
        }
        if conditioning is not None:
            # the prompts' text conditioning; the rest (e.g. Flux's image ids) from the data's first
            p = conditioning["encoder_hidden_states"].shape[0]
            positive = {k: _first(v, 1).expand(p, *v.shape[1:]) if isinstance(v, Tensor) and v.ndim
                        else v for k, v in positive.items()}  # fmt: skip
            positive.update(conditioning)
        else:
            p = min(config.samples, latents.shape[0])
            positive = {k: _first(v, p) for k, v in positive.items()}
        if negative is None:
            negative = {
                k[len("negative_") :]: v for k, v in batch.items() if k.startswith("negative_")
            }
        seeds = config.seeds
        self.prompts, self.seeds = p, seeds
        self.texts = [t for t in texts for _ in range(seeds)] if texts else None
        g = torch.Generator().manual_seed(config.seed)
        noise = torch.randn((p * seeds, *latents.shape[1:]), generator=g)
        self.noise = noise.to(latents.device, latents.dtype)
        self.ehs = _repeat(positive.pop("encoder_hidden_states", None), seeds)
        self.kwargs = {k: _repeat(v, seeds) for k, v in positive.items()}
        neg = {k: v if not isinstance(v, Tensor) or v.shape[0] == 1 else _repeat(_first(v, p), seeds)
               for k, v in negative.items()}  # fmt: skip
        self.teacher_call = GuidedCall(self.call, dmd.guidance_scale,
                                       neg.pop("encoder_hidden_states", None), neg)  # fmt: skip
        self.alarm = CollapseAlarm(config.collapse)
        self.history: list[dict[str, float]] = []
        self._teacher: dict[str, Tensor] | None = None

    # --- samples --------------------------------------------------------------------------

    def _sample(self, net: nn.Module, ladder: list[float], call: NetworkCall, mode: str) -> Tensor:
        # the student's "sde" mode draws fresh noise: from a fixed generator, not the global RNG
        g = torch.Generator(self.noise.device).manual_seed(self.config.seed + 1)
        with torch.no_grad():
            return sample(net, self.noise, ladder, mode=mode, pred_type=self.dmd.pred_type,
                          generator=g,
                          encoder_hidden_states=self.ehs, call=call, **self.kwargs)  # fmt: skip

    def _pictures(self, x: Tensor) -> Tensor | None:
        return None if self.decoder is None else self.decoder(x)

    def _features(self, x: Tensor, pictures: Tensor | None) -> Tensor:
        if self.features is not None and pictures is not None:
            return self.features(pictures)
        return _pixels(pictures if pictures is not None else x)

    def teacher_samples(self, teacher: nn.Module) -> dict[str, Tensor]:
        """The teacher's samples on the evaluation set (``teacher_steps`` guided Euler steps
        on a ladder of shift ``teacher_shift``), computed once."""
        if self._teacher is None:
            ladder = make_t_list(self.config.teacher_steps, shift=self.config.teacher_shift)
            x = self._sample(teacher, ladder, self.teacher_call, "ode")
            pictures = self._pictures(x)
            self._teacher = {"x": x, "pictures": pictures, "features": self._features(x, pictures)}
        return self._teacher

    def student_samples(self, student: nn.Module) -> dict[int, dict[str, Tensor]]:
        """The student's samples on its own ladders (1 step and K steps)."""
        out = {}
        from fastgen.consistency import MeanFlowConfig, SCMConfig, meanflow_sample

        for steps, ladder in student_ladders(self.dmd).items():
            if isinstance(self.dmd, MeanFlowConfig):  # jumps along the average velocity
                x = meanflow_sample(student, self.noise, ladder, r_keyword=self.dmd.r_keyword,
                                    encoder_hidden_states=self.ehs, call=self.call, **self.kwargs)  # fmt: skip
            else:  # a consistency model re-noises between its steps (the "sde" ladder)
                mode = "sde" if isinstance(self.dmd, SCMConfig) else self.dmd.student_sample_type
                x = self._sample(student, ladder, self.call, mode)
            pictures = self._pictures(x)
            out[steps] = {"x": x, "pictures": pictures, "features": self._features(x, pictures)}
        return out

    # --- figures --------------------------------------------------------------------------

    def evaluate(self, step: int, student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
        """One evaluation: the figures of the student's K-step samples against the teacher's,
        the alarm's verdict, and the samples (for grids).

        Returns:
            ``{"figures": {name: float}, "alarm": {...}, "teacher": ..., "student": ...}``.
        """
        t = self.teacher_samples(teacher)
        s_all = self.student_samples(student)
        s = s_all[max(s_all)]
        p, k = self.prompts, self.seeds
        fs, ft = s["features"], t["features"]
        figures = {
            "diversity": float(mean_pairwise_distance(fs.reshape(p, k, -1))),
            "diversity_ratio": float(diversity_ratio(fs.reshape(p, k, -1), ft.reshape(p, k, -1))),
            "vendi": float(vendi_score(fs.reshape(p, k, -1))),
            "fd_to_teacher": float(frechet_distance(fs, ft)),
        }
        neighbours = min(3, len(fs) - 1)
        precision, recall = knn_precision_recall(ft, fs, k=neighbours)
        figures.update(precision=float(precision), recall=float(recall))
        a = s["pictures"] if s["pictures"] is not None else s["x"]
        b = t["pictures"] if t["pictures"] is not None else t["x"]
        mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
        if s["pictures"] is not None:  # pictures in [0, 1]: the usual PSNR
            figures["psnr_to_teacher"] = float((-10 * torch.log10(mse.clamp_min(1e-12))).mean())
        if self.clip is not None and self.texts is not None and s["pictures"] is not None:
            score, _ = self.clip.scores(s["pictures"], self.texts)
            figures["clip_score"] = float(score.mean())
        verdict = self.alarm.update(figures["diversity_ratio"], s["pictures"])
        self.history.append({"step": step, **figures})
        return {"figures": figures, "alarm": verdict, "teacher": t, "student": s_all}

    def best(self, metric: str, keep: int) -> list[int]:
        """The steps of the ``keep`` best evaluations by ``metric`` (ties: the earlier)."""
        higher = HIGHER_IS_BETTER[metric]
        scored = [(h[metric], h["step"]) for h in self.history if metric in h]
        scored.sort(key=lambda fs: (-fs[0] if higher else fs[0], fs[1]))
        return sorted(step for _, step in scored[:keep])

    def last_healthy_step(self) -> int | None:
        """The step of the newest evaluation whose diversity ratio was not low."""
        ok = [h["step"] for h in self.history
              if h["diversity_ratio"] >= self.config.collapse.threshold]  # fmt: skip
        return max(ok) if ok else None

    def state_dict(self) -> dict[str, Any]:
        return {"alarm": self.alarm.state_dict(), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alarm.load_state_dict(state["alarm"])
        self.history = [dict(h) for h in state["history"]]
