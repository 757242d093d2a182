"""diffusers model folders in and out: the teacher from ``from_pretrained``, the distilled
student to ``save_pretrained``.

A teacher folder is any diffusers model folder (``config.json`` + weights), or the folder of a
whole pipeline with ``subfolder`` naming its network (``transformer``). The class comes from the
config's ``_class_name`` unless given. The export is ``out/export/transformer/`` (the EMA
student, loadable with ``<Class>.from_pretrained``) and ``out/export/fastgen.json`` (its
ladder, prediction type and timestep scale, which ``fastgen sample`` reads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.dmd.capture import attach_feature_capture
from fastgen.dmd.config import DMDConfig
from fastgen.dmd.discriminator import Discriminator
from fastgen.train.config import TeacherConfig

__all__ = [
    "call_for",
    "default_discriminator",
    "export_sharded_student",
    "export_student",
    "load_model",
    "load_teacher",
    "read_export",
    "sampling_settings",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_class(class_name: str | None, folder: Path, where: str) -> type:
    import diffusers

    if class_name is None:
        config = folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{where}: no config.json in {str(folder)!r}")
        try:
            class_name = json.loads(config.read_text(encoding="utf-8"))["_class_name"]
        except (ValueError, KeyError):
            raise ValueError(f"{where}: {config} names no '_class_name'; set the class") from None
    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{where}: diffusers has no model class {class_name!r}")
    return cls


def load_model(
    path: str | Path,
    *,
    subfolder: str | None = None,
    class_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    where: str = "model",
) -> nn.Module:
    """A diffusers model from a folder (or a hub id, where the network allows).

    Raises:
        FileNotFoundError: A local folder without ``config.json``.
        ValueError: No class name to be found, or one diffusers does not have.
    """
    folder = Path(path) / (subfolder or "")
    local = Path(path).exists()
    if local and not folder.is_dir():
        raise FileNotFoundError(f"{where}: no folder {str(folder)!r}")
    if local or class_name is not None:
        cls = _model_class(class_name, folder, where)
    else:  # a hub id: the class is read from the hub's config
        import diffusers

        cls = diffusers.AutoModel
    # float32 is from_pretrained's own default: asking for it explicitly makes models with
    # float32-kept modules (Wan) demand accelerate
    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    return cls.from_pretrained(str(path), subfolder=subfolder, **kwargs)


def load_teacher(config: TeacherConfig) -> nn.Module:
    """The run config's ``teacher`` (frozen by the pipeline)."""
    return load_model(
        config.path,
        subfolder=config.subfolder,
        class_name=config.class_name,
        dtype=_DTYPES[config.dtype],
        where="teacher",
    )


def call_for(class_name: str) -> Any:
    """The network call a diffusers class needs: Qwen-Image's packed one, or ``None`` (the
    standard keywords)."""
    if class_name == "QwenImageTransformer2DModel":
        from fastgen.plugins.qwen_image import QwenImageCall

        return QwenImageCall()
    return None


def _last_if_tuple(output: Any) -> Any:
    # a joint (MMDiT) block returns (encoder_hidden_states, hidden_states): the image tokens
    return output[-1] if isinstance(output, tuple) else output


def default_discriminator(teacher: nn.Module, *, hidden: int = 128) -> nn.Module:
    """The GAN branch's wiring for a diffusers transformer: a feature capture on the middle block
    of its block list (``transformer_blocks``; ``blocks`` for Wan), on the image tokens, and a
    token :class:`~fastgen.Discriminator` of the transformer's width.

    Raises:
        ValueError: The teacher has no block list, or its config gives no width.
    """
    for attr in ("transformer_blocks", "blocks"):
        blocks = getattr(teacher, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            break
    else:
        raise ValueError(
            f"the GAN branch taps the teacher's blocks: {type(teacher).__name__} has no "
            "transformer_blocks or blocks"
        )
    config = getattr(teacher, "config", None)
    try:
        width = int(config.num_attention_heads) * int(config.attention_head_dim)
    except (AttributeError, TypeError):
        raise ValueError(
            f"{type(teacher).__name__}'s config gives no num_attention_heads * "
            "attention_head_dim (the tapped tokens' width)"
        ) from None
    attach_feature_capture(teacher, [len(blocks) // 2], blocks=attr, transform=_last_if_tuple)
    return Discriminator([width], layout="tokens", hidden=hidden)


def export_student(
    student: nn.Module, out: str | Path, dmd: DMDConfig, teacher: TeacherConfig | None = None
) -> Path:
    """Save the (EMA) student as ``out/export/transformer`` and its sampling settings.

    A LoRA student is saved with its adapters merged, and the adapter alone in
    ``out/export/lora`` (peft's format). When the teacher came from a whole pipeline folder
    (``model_index.json`` and a ``subfolder``), ``out/export/pipeline`` is a copy of it with the
    student in that subfolder and a flow-matching scheduler that follows the student's ladder
    as given (``shift=1``): ``DiffusionPipeline.from_pretrained`` loads it, and
    ``pipe(..., num_inference_steps=K, sigmas=t_list[:-1], guidance_scale=1.0)`` samples as
    the student was trained to.

    Args:
        student: A plain copy of the student with the weights to export.
        out: The run folder.
        dmd: The run's DMD2 config (its ladder, ``pred_type``, timestep scale).
        teacher: The run config's teacher (for the pipeline folder).

    Returns:
        The export folder ``out/export``.

    Raises:
        TypeError: The student is no diffusers model (it has no ``save_pretrained``).
    """
    if not hasattr(student, "save_pretrained"):
        raise TypeError(
            f"the student ({type(student).__name__}) has no save_pretrained: export needs a "
            "diffusers model"
        )
    from fastgen.train.lora import has_lora, merged, save_adapter

    folder = Path(out) / "export"
    if has_lora(student):
        save_adapter(student, folder / "lora")
        student = merged(student)
    student.save_pretrained(str(folder / "transformer"))
    _finish_export(folder, student, dmd, teacher)
    return folder


def export_sharded_student(
    student: nn.Module, out: str | Path, dmd: DMDConfig, teacher: TeacherConfig | None = None
) -> Path | None:
    """:func:`export_student` for an FSDP2-sharded diffusers student, without a whole copy:
    every rank calls it; each weight is all-gathered in turn and rank 0 writes it straight
    into ``diffusion_pytorch_model.safetensors`` (a LoRA layer merged once its base weight and
    adapters have come), so rank 0 holds one full tensor at a time (a LoRA layer's three).

    Returns:
        The export folder on rank 0, ``None`` on the others.

    Raises:
        TypeError: The student is no diffusers model, or carries LoRA layers other than
            ``Linear`` ones (export those with :meth:`~fastgen.train.Trainer.ema_student`).
    """
    import torch.distributed as dist

    from fastgen.train.lora import _peft_config, save_adapter_state
    from fastgen.train.sharding import lora_layers, merged_gathered, write_safetensors

    if not hasattr(student, "save_config"):
        raise TypeError(f"the student ({type(student).__name__}) is no diffusers model")
    layers = lora_layers(student)
    if layers is None:
        raise TypeError("only Linear LoRA layers merge on the way: use Trainer.ema_student()")
    main = not dist.is_initialized() or dist.get_rank() == 0
    folder = Path(out) / "export"
    target = folder / "transformer"
    adapter: dict[str, torch.Tensor] = {}
    tensors = merged_gathered(student, adapter)
    if main:
        target.mkdir(parents=True, exist_ok=True)
        write_safetensors(target / "diffusion_pytorch_model.safetensors", tensors)
        student.save_config(str(target))
        if layers:
            save_adapter_state(adapter, _peft_config(student._fastgen_lora), folder / "lora")
        _finish_export(folder, student, dmd, teacher)
    else:
        for _ in tensors:  # the gathers rank 0 waits on
            pass
    return folder if main else None


def _finish_export(
    folder: Path, student: nn.Module, dmd: DMDConfig, teacher: TeacherConfig | None
) -> None:
    """The pipeline folder (when the teacher came from one) and ``fastgen.json``."""
    meanflow = hasattr(student, "r_embedder")  # a diffusers pipeline would drop its r
    if teacher is not None and teacher.subfolder is not None and not meanflow:
        source = Path(teacher.path)
        if (source / "model_index.json").is_file():
            _export_pipeline(source, teacher.subfolder, folder / "transformer", folder / "pipeline")
    settings = sampling_settings(dmd, type(getattr(student, "base", student)).__name__)
    (folder / "fastgen.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def _export_pipeline(source: Path, subfolder: str, student: Path, target: Path) -> None:
    """``source``'s pipeline with the exported ``student`` folder in place of ``subfolder``."""
    import shutil

    if target.exists():
        shutil.rmtree(target)
    # everything but the teacher's own weights, which the student's replace
    shutil.copytree(
        source, target, ignore=lambda d, names: names if Path(d) == source / subfolder else []
    )
    shutil.copytree(student, target / subfolder, dirs_exist_ok=True)
    config_file = target / "scheduler" / "scheduler_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            config.update(shift=1.0, use_dynamic_shifting=False)  # the ladder's sigmas as given
            config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def sampling_settings(dmd: Any, class_name: str) -> dict[str, Any]:
    """How the student samples (``fastgen.json`` of an export): its ladder, prediction type,
    timestep scale, ODE or SDE steps (``"meanflow"``: jumps along the average velocity), and
    its diffusers class. ``dmd`` is the run's method config: a DMD2 student's ladder is its
    own, a consistency model's sCM's 2-step ladder, MeanFlow's two jumps through 0.5."""
    from fastgen.consistency import MeanFlowConfig, SCMConfig, scm_t_list

    if isinstance(dmd, SCMConfig):
        t_list, kind = scm_t_list(2, sigma_data=dmd.sigma_data), "sde"
    elif isinstance(dmd, MeanFlowConfig):
        t_list, kind = [1.0, 0.5, 0.0], "meanflow"
    else:
        t_list = dmd.sample_t_cfg.t_list or [dmd.sample_t_cfg.max_t, 0.0]
        kind = dmd.student_sample_type
    settings = {
        "t_list": list(t_list),
        "pred_type": dmd.pred_type,
        "num_train_timesteps": dmd.num_train_timesteps,
        "student_sample_type": kind,
        "class_name": class_name,
    }
    if kind == "meanflow":
        settings["r_keyword"] = dmd.r_keyword
    return settings


def load_exported(
    folder: str | Path, settings: dict[str, Any], where: str = "--student"
) -> nn.Module:
    """The exported student in ``folder`` (a :class:`~fastgen.consistency.MeanFlowNet` when it
    samples by MeanFlow's jumps), in eval mode."""
    if settings.get("student_sample_type") == "meanflow":
        from fastgen.consistency.networks import MeanFlowNet

        base = load_model(folder, class_name=settings.get("class_name"), where=where)
        net = MeanFlowNet(base)
        from safetensors.torch import load_file

        file = Path(folder) / "r_embedder.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{where}: no {file} (a MeanFlow export holds it)")
        net.r_embedder.load_state_dict(load_file(str(file)))
        return net.eval()
    return load_model(folder, class_name=settings.get("class_name"), where=where).eval()


def sample_exported(
    student: nn.Module,
    noise: torch.Tensor,
    t_list: list[float],
    settings: dict[str, Any],
    encoder_hidden_states: torch.Tensor | None,
    model_kwargs: dict[str, Any],
) -> torch.Tensor:
    """Sample an exported student on ``t_list`` as its ``fastgen.json`` says (no gradient)."""
    from fastgen.sampling import sample

    name = settings.get("class_name") or type(student).__name__
    with torch.no_grad():
        if settings["student_sample_type"] == "meanflow":
            from fastgen.consistency import meanflow_sample

            return meanflow_sample(student, noise, t_list, r_keyword=settings["r_keyword"],
                                   num_train_timesteps=settings["num_train_timesteps"],
                                   encoder_hidden_states=encoder_hidden_states,
                                   call=call_for(name), **model_kwargs)  # fmt: skip
        return sample(student, noise, t_list, mode=settings["student_sample_type"],
                      pred_type=settings["pred_type"],
                      num_train_timesteps=settings["num_train_timesteps"],
                      encoder_hidden_states=encoder_hidden_states, call=call_for(name),
                      **model_kwargs)  # fmt: skip


def read_export(folder: str | Path) -> dict[str, Any]:
    """The sampling settings next to an exported student (``fastgen.json``).

    Raises:
        FileNotFoundError: No ``fastgen.json`` in ``folder`` or its parent.
    """
    folder = Path(folder)
    for candidate in (folder / "fastgen.json", folder.parent / "fastgen.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(
        f"no fastgen.json in {str(folder)!r} or its parent (an export of fastgen distill)"
    )
