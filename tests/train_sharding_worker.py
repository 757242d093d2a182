"""FSDP2 networks built on the meta device and filled shard by shard, on 2 gloo ranks:
``torchrun --nproc_per_node=2 tests/train_sharding_worker.py RUN_YAML OUT``. Run by
tests/test_train_sharding.py; rank 0 prints one JSON line.

RUN_YAML is a tiny SD3 folder's run (tests/families.py, ``parallel: fsdp2``, the GAN branch on).
The worker checks, on every rank:

- each network's local shards equal the rows of the folder's full tensors (the student and fake
  score float32, the teacher in its dtype; a bfloat16 teacher's student equals
  ``teacher.to(float32)``);
- the run built this way trains to the same weights, EMA and optimizer states, bitwise, as the
  run built from whole networks that the trainer shards (with activation checkpointing);
- stopped at step 2 and resumed to 4, it equals the straight run to 4;
- with ``cpu_offload`` (FSDP2's and the EMA's) the networks are offloaded and train the same;
- ``ema_student(rank0_only=True)`` gives rank 0 a plain network holding the EMA weights.

With ``lora:`` in RUN_YAML: the students' base rows are the file's, only the adapters train
(``B = 0``, ``A``'s shards the rows of a whole network's init), a run resumes bitwise, and the
EMA student carries the adapters.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import differences, full
from runs import full as full_tensor
from test_train import state_of
from workers import finish

from fastgen.train import RunConfig, build
from fastgen.train.build import build_networks
from fastgen.train.lora import merged
from fastgen.train.sharding import is_offloaded, is_sharded


@contextmanager
def whole_networks():
    """``build`` loads whole networks from the folder and the trainer shards them (the path
    before meta-device construction), inside the block."""
    build_module = sys.modules["fastgen.train.build"]
    from_folder = build_module._shards_from_folder
    build_module._shards_from_folder = lambda run: False
    try:
        yield
    finally:
        build_module._shards_from_folder = from_folder


def _rows_equal(net, full: dict[str, torch.Tensor], dtype_of) -> list[str]:
    bad = []
    for name, p in net.named_parameters():
        want = full[name].to(dtype_of(name)).to(p.dtype)
        rows = distribute_tensor(want, p.device_mesh, p.placements, src_data_rank=None)
        if not torch.equal(p.to_local(), rows.to_local()):
            bad.append(name)
    return bad


def shards(run: RunConfig) -> dict:
    from diffusers import SD3Transformer2DModel

    folder = Path(run.teacher.path) / run.teacher.subfolder
    full = dict(SD3Transformer2DModel.from_pretrained(str(folder)).state_dict())
    out = {}
    for dtype in ("float32", "bfloat16"):
        r = run.model_copy(update={"teacher": run.teacher.model_copy(update={"dtype": dtype})})
        nets = build_networks(r, r.method_config())
        teacher = nets["teacher"]
        kept = {n: p.dtype for n, p in teacher.named_parameters()}
        out[dtype] = {
            "sharded": sorted(n for n, net in nets.items() if is_sharded(net)),
            "meta_left": sum(p.is_meta for net in nets.values() for p in net.parameters()),
            "teacher_dtypes": sorted({str(d) for d in kept.values()}),
            **{
                name: _rows_equal(nets[name], full, kept.__getitem__)
                for name in ("teacher", "student", "fake_score")
            },
            "local_rows": sum(p.to_local().numel() for p in teacher.parameters()),
            "rows": sum(p.numel() for p in teacher.parameters()),
        }
    return out


def lora_shards(run: RunConfig) -> dict:
    """LoRA on networks built on meta: the base rows are the file's, only the adapters train,
    ``B = 0``, and ``A``'s shards are the rows of peft's init of a whole network."""
    from diffusers import SD3Transformer2DModel

    from fastgen.train.lora import add_lora
    from fastgen.train.sharding import init_lora_shards

    folder = Path(run.teacher.path) / run.teacher.subfolder
    whole = SD3Transformer2DModel.from_pretrained(str(folder))
    full = dict(whole.state_dict())
    nets = build_networks(run, run.method_config())
    student = nets["student"]
    base = {n.replace(".base_layer.", "."): p
            for n, p in student.named_parameters() if "lora_" not in n}  # fmt: skip
    out = {
        "base_not_teachers": not_shared(nets),
        "base_rows_differ": [n for n, p in base.items() if not torch.equal(
            p.to_local(), distribute_tensor(full[n], p.device_mesh, p.placements,
                                            src_data_rank=None).to_local())],
        "trainable": sorted({n.split(".")[-2] for n, p in student.named_parameters()
                             if p.requires_grad}),
        "b_nonzero": sum(int(p.to_local().abs().sum() > 0)
                         for n, p in student.named_parameters() if "lora_B" in n),
    }  # fmt: skip
    add_lora(whole, run.lora)
    torch.manual_seed(7)
    init_lora_shards(whole)
    torch.manual_seed(7)
    init_lora_shards(student)
    want = dict(whole.named_parameters())
    out["a_rows_differ"] = [
        n for n, p in student.named_parameters() if "lora_A" in n and not torch.equal(
            p.to_local(), distribute_tensor(want[n].detach(), p.device_mesh, p.placements,
                                            src_data_rank=None).to_local())
    ]  # fmt: skip
    out["a_count"] = sum("lora_A" in n for n in want)
    out["bfloat16"] = bf16_lora_copies(run)
    return out


def storage(p: torch.Tensor) -> int:
    """Where a parameter's local shard lives (0 for an empty shard)."""
    return p.to_local().untyped_storage().data_ptr()


def not_shared(nets: dict) -> list[str]:
    """The frozen parameters of the student and the fake score whose shard is not the
    teacher's own storage, nor their FSDP2 all-gather input (one base in memory)."""
    from fastgen.train.sharding import _fsdp_params

    teacher = dict(nets["teacher"].named_parameters())
    out = []
    for name in ("student", "fake_score"):
        records = _fsdp_params(nets[name])
        for prefix, module in nets[name].named_modules():
            for key, p in module._parameters.items():
                if p is None or p.requires_grad:
                    continue
                full = f"{prefix}.{key}" if prefix else key
                t = teacher[full.replace(".base_layer.", ".")]
                gathered = records[id(module), key]._sharded_param_data
                if t.to_local().numel() and (
                    storage(p) != storage(t) or gathered.untyped_storage().data_ptr() != storage(t)
                ):
                    out.append(f"{name}.{full}")
    return out


def bf16_lora_copies(run: RunConfig) -> dict:
    """With a bfloat16 teacher, the LoRA copies' base is the teacher's rows in its dtype (no
    float32 copy of what never trains), the adapters float32; a step trains the adapters only."""
    fields = run.model_dump() | {"precision": "bf16", "steps": 1}
    fields["teacher"] |= {"dtype": "bfloat16"}
    r = RunConfig.model_validate(fields)
    nets = build_networks(r, r.method_config())
    teacher = {n: p.to_local() for n, p in nets["teacher"].named_parameters()}
    out = {}
    for name in ("student", "fake_score"):
        params = dict(nets[name].named_parameters())
        base = {n.replace(".base_layer.", "."): p for n, p in params.items() if "lora_" not in n}
        out[name] = {
            "base_vs_teacher": [n for n, p in base.items() if p.dtype != teacher[n].dtype
                                or not torch.equal(p.to_local(), teacher[n])],
            "base_dtypes": sorted({str(p.dtype) for p in base.values()}),
            "adapter_dtypes": sorted({str(p.dtype) for n, p in params.items() if "lora_" in n}),
        }  # fmt: skip
    out["base_not_teachers"] = not_shared(nets)
    trainer = build(r)
    pipe = trainer.pipeline
    before = {n: full(p).clone() for n, p in pipe.student.named_parameters()}
    teacher_before = {n: full(p).clone() for n, p in pipe.teacher.named_parameters()}
    trainer.fit()
    after = {n: full(p) for n, p in pipe.student.named_parameters()}
    out["changed"] = sorted({n.split(".")[-2] for n in before
                             if not torch.equal(before[n], after[n])})  # fmt: skip
    out["teacher_changed"] = [n for n, q in pipe.teacher.named_parameters()
                              if not torch.equal(full(q), teacher_before[n])]  # fmt: skip
    out["trained_base_not_teachers"] = not_shared(
        {"teacher": pipe.teacher, "student": pipe.student, "fake_score": pipe.fake_score}
    )
    return out


def lora(run) -> dict:
    result = {"shards": lora_shards(run("shards", 2))}
    straight = build(run("straight", 4))
    straight.fit()
    first = build(run("resumed", 2))
    first.fit()
    resumed = build(run("resumed", 4))
    result["resumed_from"] = resumed.fit()["resumed_from"]
    want = state_of(straight)
    result["resumed_vs_straight"] = differences(want, state_of(resumed))
    result["tensors"] = len(want)
    plain = straight.ema_student(rank0_only=True)
    folder = streamed_export(straight, result)  # the adapters merged on the way
    if dist.get_rank() == 0:
        result["ema_student_adapters"] = sum("lora_A" in n for n, _ in plain.named_parameters())
        result["export_vs_merged"] = same_file(folder / "transformer", merged(plain).state_dict())
        from peft.utils import get_peft_model_state_dict

        result["adapter_vs_peft"] = same_file(folder / "lora", get_peft_model_state_dict(plain),
                                              name="adapter_model.safetensors")  # fmt: skip
    else:
        result["other_rank_export"] = repr(folder)
    return result


def streamed_export(trainer, result: dict):
    """``trainer.export()``, counting the calls of the streamed export under it."""
    import fastgen.train.folders as folders

    streamed = folders.export_sharded_student
    result["streamed"] = 0

    def counted(*args):
        result["streamed"] += 1
        return streamed(*args)

    folders.export_sharded_student = counted
    try:
        return trainer.export()
    finally:
        folders.export_sharded_student = streamed


def same_file(folder, want, name="diffusion_pytorch_model.safetensors") -> list[str]:
    """The keys where ``folder``'s safetensors file differs from ``want`` (bitwise; a key only
    on one side counts)."""
    from safetensors.torch import load_file

    got = load_file(str(folder / name))
    keys = set(got) | set(want)
    return sorted(k for k in keys if k not in got or k not in want
                  or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k]))  # fmt: skip


def meanflow(run) -> dict:
    """MeanFlow's student built on meta: the folder's rows (``r_embedder`` the timestep MLP's,
    its last layer zero), the same training as a whole student the trainer shards (with CPU
    offload), the EMA student a plain MeanFlowNet, and its export."""
    from diffusers import SD3Transformer2DModel

    from fastgen.consistency.networks import MeanFlowNet

    r = run("shards", 2)
    folder = Path(r.teacher.path) / r.teacher.subfolder
    full = dict(MeanFlowNet(SD3Transformer2DModel.from_pretrained(str(folder))).state_dict())
    nets = build_networks(r, r.method_config())
    student = nets["student"]
    result = {
        "networks": sorted(nets),
        "student": type(student).__name__,
        "sharded": sorted(n for n, net in nets.items() if is_sharded(net)),
        "student_rows_differ": _rows_equal(student, full, lambda name: torch.float32),
        "r_rows": sum("r_embedder" in n for n, _ in student.named_parameters()),
    }
    # a bf16 teacher with LoRA: the base stays bf16, the new embedding of t - r is float32
    fields = r.model_dump() | {"precision": "bf16", "lora": {"rank": 2}}
    fields["teacher"] |= {"dtype": "bfloat16"}
    bf16 = RunConfig.model_validate(fields)
    lora_student = build_networks(bf16, bf16.method_config())["student"]
    result["bf16_lora_dtypes"] = {
        part: sorted({str(p.dtype) for n, p in lora_student.named_parameters()
                      if n.startswith(part) and "lora_" not in n})
        for part in ("r_embedder.", "base.")
    }  # fmt: skip
    on_meta = build(run("meta", 2))
    on_meta.fit()
    with whole_networks():  # and offloaded, as the trainer shards it: the same run
        whole = build(run("whole", 2, cpu_offload=True))
        result["whole_copied_for_ema"] = whole._ema_net is not None
        result["whole_offloaded"] = is_offloaded(whole.pipeline.student)
        whole.fit()
    result["meta_vs_whole"] = differences(state_of(whole), state_of(on_meta))
    ema = {k: full_tensor(v) for k, v in on_meta.pipeline.ema.sharded_state_dict().items()}
    plain = on_meta.ema_student(rank0_only=True)
    exported = on_meta.export()
    if dist.get_rank() == 0:
        result["ema_student"] = type(plain).__name__
        result["ema_student_vs_ema"] = [k for k, v in ema.items()
                                        if not torch.equal(plain.state_dict()[k], v)]  # fmt: skip
        result["exported_r_embedder"] = (
            exported / "transformer" / "r_embedder.safetensors"
        ).is_file()
    return result


def main() -> None:
    config, out = Path(sys.argv[1]), Path(sys.argv[2])
    fields = yaml.safe_load(config.read_text())

    def run(name: str, steps: int, **extra) -> RunConfig:
        return RunConfig.model_validate(fields | {"out": str(out / name), "steps": steps} | extra)

    if fields.get("lora") is not None or fields["recipe"].startswith("meanflow"):
        result = lora(run) if fields.get("lora") is not None else meanflow(run)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        finish({"ranks": gathered})
    result = {"world": None, "shards": shards(run("shards", 2))}
    dist.barrier()
    result["world"] = dist.get_world_size()

    on_meta = build(run("meta", 2))
    on_meta.fit()
    with whole_networks():  # and with activation checkpointing: the same gradients, same run
        whole = build(run("whole", 2, activation_checkpointing=True))
        result["checkpointed_blocks"] = sum(
            getattr(b, "_checkpointed", False) for b in whole._plain_student.modules()
        )
        result["whole_is_sharded_by_the_trainer"] = is_sharded(whole.pipeline.teacher)
        whole.fit()
    result["meta_vs_whole"] = differences(state_of(whole), state_of(on_meta))
    # FSDP2's CPU offload, and the EMA's: the same run (host memory is all gloo has)
    ema = fields["dmd"]["ema"] | {"cpu_offload": True}
    offloaded = build(run("offloaded", 2, cpu_offload=True, dmd=fields["dmd"] | {"ema": ema}))
    pipe = offloaded.pipeline
    result["offloaded"] = [is_offloaded(n) for n in (pipe.teacher, pipe.student, pipe.fake_score)]
    offloaded.fit()
    result["offloaded_vs_meta"] = differences(state_of(on_meta), state_of(offloaded))

    straight = build(run("straight", 4))
    straight.fit()
    resumed = build(run("meta", 4))
    summary = resumed.fit()
    result["resumed_from"] = summary["resumed_from"]
    want = state_of(straight)
    result["resumed_vs_straight"] = differences(want, state_of(resumed))
    result["tensors"] = len(want)

    ema = {k: full(v) for k, v in straight.pipeline.ema.sharded_state_dict().items()}
    plain = straight.ema_student(rank0_only=True)
    if dist.get_rank() == 0:
        result["ema_student_plain"] = not any(hasattr(p, "to_local") for p in plain.parameters())
        result["ema_student_vs_ema"] = [
            k for k, v in plain.state_dict().items() if k in ema and not torch.equal(v, ema[k])
        ]
        result["ema_student_keys"] = len(set(plain.state_dict()) & set(ema))
    else:
        result["other_rank_gets"] = repr(plain)
    folder = streamed_export(straight, result)
    if dist.get_rank() == 0:
        result["export_vs_ema_student"] = same_file(folder / "transformer", plain.state_dict())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    finish({"ranks": gathered})


if __name__ == "__main__":
    main()
