"""fastgen.train.sharding: networks built on the meta device, sharded per block and filled from
the model folder's safetensors a rank's rows at a time (tests/train_sharding_worker.py on 2 gloo
ranks), and the pieces one process can check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from families import WAN, build, run_yaml

from fastgen.train.sharding import (
    BLOCK_VARIANTS,
    blocks,
    checkpoint_blocks,
    empty_network,
    load_shards,
    safetensors_files,
    shard_network,
)

WORKER = Path(__file__).resolve().parent / "train_sharding_worker.py"


def _torchrun(*args: str, n: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
         *args],
        capture_output=True, text=True, timeout=500, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_an_empty_network_holds_no_weights_and_loads_to_from_pretrained(tmp_path, family):
    import diffusers

    net = build(family)
    net.save_pretrained(str(tmp_path))
    cls = type(net)
    config = json.loads((tmp_path / "config.json").read_text())
    empty = empty_network(cls, config)
    assert all(p.is_meta for p in empty.parameters())
    assert not any(b.is_meta for b in empty.buffers())  # rotary tables (Wan) are built for real
    loaded = load_shards(empty, tmp_path)
    want = cls.from_pretrained(str(tmp_path))
    assert sorted(loaded.state_dict()) == sorted(want.state_dict())
    for k, v in want.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for (k, b), (_, c) in zip(loaded.named_buffers(), want.named_buffers()):
        assert torch.equal(b, c), k
    assert isinstance(loaded, getattr(diffusers, type(want).__name__))


def test_a_bfloat16_empty_network_keeps_the_classes_float32_modules():
    import diffusers

    cls = diffusers.WanTransformer3DModel
    net = empty_network(cls, WAN, torch.bfloat16)
    keep = cls._keep_in_fp32_modules
    for name, p in net.named_parameters():
        kept = any(k in name.split(".") for k in keep)
        assert p.dtype == (torch.float32 if kept else torch.bfloat16), name
    assert any(p.dtype == torch.float32 for p in net.parameters())


def test_a_missing_or_misshapen_tensor_names_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    net = build("sd3")
    net.save_pretrained(str(tmp_path))
    (file,) = set(safetensors_files(tmp_path).values())
    state = load_file(str(file))
    config = json.loads((tmp_path / "config.json").read_text())
    cls = type(net)
    name = "proj_out.weight"
    save_file({k: v for k, v in state.items() if k != name}, str(file))
    with pytest.raises(KeyError, match=rf"no tensor '{name}'"):
        load_shards(empty_network(cls, config), tmp_path)
    save_file(state | {name: state[name][:1]}, str(file))
    with pytest.raises(KeyError, match=rf"{file.name}: '{name}' has shape"):
        load_shards(empty_network(cls, config), tmp_path)


def test_a_lora_network_shares_the_teachers_shards_and_refuses_another_dtype(
    tmp_path, one_rank_group
):
    from peft.tuners.lora import LoraLayer

    from fastgen.train.config import LoraConfig
    from fastgen.train.lora import add_lora

    net = build("sd3")
    net.save_pretrained(str(tmp_path))
    cls, config = type(net), json.loads((tmp_path / "config.json").read_text())
    teacher = empty_network(cls, config).requires_grad_(False)
    load_shards(shard_network(teacher), tmp_path)
    lora = LoraConfig(rank=2, target_modules=["to_q", "to_v"])
    student = add_lora(empty_network(cls, config), lora)
    load_shards(shard_network(student), tmp_path, skip="lora_", base=teacher)
    mine = {n.replace(".base_layer.", "."): p
            for n, p in student.named_parameters() if "lora_" not in n}  # fmt: skip
    assert sorted(mine) == sorted(n for n, _ in teacher.named_parameters())
    for name, t in teacher.named_parameters():
        assert mine[name].to_local().data_ptr() == t.to_local().data_ptr(), name  # one storage
    assert sum(isinstance(m, LoraLayer) for m in student.modules()) == 2 * len(blocks(student))
    # a base of another dtype than the teacher's cannot be its shards: named, not copied
    other = add_lora(empty_network(cls, config, torch.bfloat16), lora)
    with pytest.raises(
        ValueError, match=r"pos_embed\.proj\.weight: torch\.bfloat16 .* cannot share"
    ):
        load_shards(shard_network(other), tmp_path, skip="lora_", base=teacher)


def test_blocks_are_the_outermost_lists():
    net = build("sd3")
    assert blocks(net) == list(net.transformer_blocks)


def test_networks_built_on_meta_are_the_folders_rows_and_train_like_whole_ones(tmp_path):
    config = run_yaml(tmp_path, "sd3", parallel="fsdp2")
    fields = yaml.safe_load(Path(config).read_text())
    fields["dmd"]["ema"]["mode"] = "local_shard"  # the EMA's shadows are shards too
    Path(config).write_text(yaml.safe_dump(fields))
    proc = _torchrun(str(WORKER), config, str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("{"))
    ranks = json.loads(line)["ranks"]
    print(ranks)
    for rank, r in enumerate(ranks):
        assert r["world"] == 2
        for dtype, s in r["shards"].items():
            assert s["sharded"] == ["fake_score", "student", "teacher"], dtype
            assert s["meta_left"] == 0
            assert s["teacher"] == s["student"] == s["fake_score"] == [], (rank, dtype)
            assert 0 < s["local_rows"] < s["rows"]  # a rank holds a part, not the whole
        assert r["shards"]["bfloat16"]["teacher_dtypes"] == ["torch.bfloat16"]
        assert r["whole_is_sharded_by_the_trainer"] is True
        assert r["checkpointed_blocks"] == 2
        assert r["meta_vs_whole"] == [], rank
        assert r["offloaded"] == [True, True, True]
        assert r["offloaded_vs_meta"] == [], rank
        assert r["resumed_from"] == 2
        assert r["resumed_vs_straight"] == [], rank
        assert r["tensors"] > 100
    assert ranks[0]["ema_student_plain"] is True and ranks[0]["ema_student_vs_ema"] == []
    assert ranks[0]["ema_student_keys"] > 50
    assert ranks[1]["other_rank_gets"] == "None"
    assert ranks[0]["export_vs_ema_student"] == []  # streamed, bitwise the gathered copy
    assert [r["streamed"] for r in ranks] == [1, 1]  # no whole copy on rank 0
    # the two halves of the teacher are the whole teacher
    assert (
        sum(r["shards"]["float32"]["local_rows"] for r in ranks)
        == ranks[0]["shards"]["float32"]["rows"]
    )


def test_lora_networks_built_on_meta_hold_the_folders_base_and_sharded_adapters(tmp_path):
    config = run_yaml(tmp_path, "sd3", parallel="fsdp2", lora={"rank": 4})
    proc = _torchrun(str(WORKER), config, str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))["ranks"]
    print(ranks)
    for r in ranks:
        s = r["shards"]
        assert s["base_rows_differ"] == [] and s["a_rows_differ"] == []
        # one base: every frozen shard of student and fake score is the teacher's storage
        assert s["base_not_teachers"] == [] and s["bfloat16"]["base_not_teachers"] == []
        assert s["bfloat16"]["trained_base_not_teachers"] == []
        assert s["bfloat16"]["teacher_changed"] == []
        assert s["trainable"] == ["default"] and s["b_nonzero"] == 0 and s["a_count"] > 4
        for copy in s["bfloat16"]["student"], s["bfloat16"]["fake_score"]:
            assert copy["base_vs_teacher"] == [] and copy["adapter_dtypes"] == ["torch.float32"]
            assert "torch.bfloat16" in copy["base_dtypes"]
        assert s["bfloat16"]["changed"] == ["default"]  # one step moves the adapters only
        assert r["resumed_from"] == 2 and r["resumed_vs_straight"] == [] and r["tensors"] > 100
    assert ranks[0]["ema_student_adapters"] == ranks[0]["shards"]["a_count"]
    # streamed and merged on the way: bitwise the merged gathered copy, the adapter peft's
    assert ranks[0]["export_vs_merged"] == [] and ranks[0]["adapter_vs_peft"] == []
    assert ranks[1]["other_rank_export"] == "None"
    assert [r["streamed"] for r in ranks] == [1, 1]


def test_fastgen_distill_on_fsdp2_exports_from_the_shards(tmp_path):
    from diffusers import SD3Transformer2DModel

    config = run_yaml(tmp_path, "sd3", parallel="fsdp2", steps=1)
    fields = yaml.safe_load(Path(config).read_text())
    fields["dmd"]["ema"] = None  # the student's own weights are exported
    Path(config).write_text(yaml.safe_dump(fields))
    proc = _torchrun("-m", "fastgen.cli", "distill", config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("exported the student to") == 1
    exported = SD3Transformer2DModel.from_pretrained(
        str(tmp_path / "run" / "export" / "transformer")
    )
    teacher = SD3Transformer2DModel.from_pretrained(str(tmp_path / "teacher" / "transformer"))
    moved = [k for k, v in exported.state_dict().items()
             if not torch.equal(v, teacher.state_dict()[k])]  # fmt: skip
    assert moved  # one step of training moved the student's weights


def test_checkpointed_blocks_give_the_same_outputs_and_gradients_in_one_frame():
    from families import samples
    from torch._dynamo.testing import CompileCounter

    plain, checkpointed = build("sd3"), checkpoint_blocks(build("sd3"))
    assert sum(getattr(b, "_checkpointed", False) for b in checkpointed.modules()) == 2
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    batch = samples("sd3", 2)
    kw = {k: batch[k] for k in ("encoder_hidden_states", "pooled_projections")}
    t = torch.tensor([300.0, 700.0])

    def loss(net):
        return net(batch["latents"], timestep=t, **kw).sample.square().mean()

    loss(plain).backward()
    counter = CompileCounter()
    torch.compile(loss, backend=counter, fullgraph=True, dynamic=True)(checkpointed).backward()
    assert counter.frame_count == 1
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    for p in checkpointed.parameters():
        p.grad = None
    loss(checkpointed).backward()  # eager: the very same gradients
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(q.grad, p.grad), name


def test_a_checkpointed_run_is_the_plain_run(tmp_path):
    from runs import differences
    from test_train import run_config, state_of, trainer
    from train_toys import Data

    plain = trainer(run_config(tmp_path / "a", steps=2), Data())
    plain.fit()
    checkpointed = trainer(
        run_config(tmp_path / "b", steps=2, activation_checkpointing=True), Data()
    )
    checkpointed.fit()
    assert any(getattr(m, "_checkpointed", False) for m in checkpointed._plain_student.modules())
    assert differences(state_of(plain), state_of(checkpointed)) == []


def test_a_bfloat16_wan_teacher_on_fsdp2_trains_and_exports_from_the_shards(tmp_path):
    """Wan: rotary tables are non-persistent buffers (built, not read) and some modules stay
    float32 under a bfloat16 teacher; FSDP2's bf16 mixed precision on top."""
    from diffusers import WanTransformer3DModel

    config = run_yaml(tmp_path, "wan", parallel="fsdp2", steps=2, precision="bf16")
    fields = yaml.safe_load(Path(config).read_text())
    fields["teacher"]["dtype"] = "bfloat16"
    fields["dmd"]["ema"]["mode"] = "local_shard"
    Path(config).write_text(yaml.safe_dump(fields))
    proc = _torchrun("-m", "fastgen.cli", "distill", config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "done: 2 steps" in proc.stdout
    exported = WanTransformer3DModel.from_pretrained(
        str(tmp_path / "run" / "export" / "transformer")
    )
    teacher = WanTransformer3DModel.from_pretrained(str(tmp_path / "teacher" / "transformer"))
    assert exported.state_dict().keys() == teacher.state_dict().keys()
    assert all(torch.isfinite(v).all() for v in exported.state_dict().values())
    assert any(
        not torch.equal(v, teacher.state_dict()[k]) for k, v in exported.state_dict().items()
    )


def test_a_meanflow_student_built_on_meta_holds_the_folders_rows_and_trains_like_a_whole_one(
    tmp_path,
):
    config = run_yaml(tmp_path, "sd3", parallel="fsdp2")
    fields = yaml.safe_load(Path(config).read_text())
    del fields["dmd"]
    fields |= {"recipe": "meanflow_sd3",
               "meanflow": {"ema": {"decay": 0.5, "mode": "local_shard"}}}  # fmt: skip
    Path(config).write_text(yaml.safe_dump(fields))
    proc = _torchrun(str(WORKER), config, str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))["ranks"]
    print(ranks)
    for r in ranks:
        assert r["networks"] == r["sharded"] == ["student", "teacher"]
        assert r["student"].endswith("MeanFlowNet") and r["r_rows"] >= 2
        assert r["student_rows_differ"] == []
        assert r["whole_copied_for_ema"] is False  # rebuilt from the config instead
        assert r["whole_offloaded"] is True
        assert r["meta_vs_whole"] == []
        assert r["bf16_lora_dtypes"]["r_embedder."] == ["torch.float32"]
        assert "torch.bfloat16" in r["bf16_lora_dtypes"]["base."]
    assert ranks[0]["ema_student"] == "MeanFlowNet" and ranks[0]["ema_student_vs_ema"] == []
    assert ranks[0]["exported_r_embedder"] is True


def test_compile_under_fsdp2_compiles_each_block_whole_and_trains_like_eager(tmp_path):
    """FSDP2's hooks cannot be traced: with ``compile: true`` every transformer block compiles
    whole (one graph per variant, no break), DMD2 and sCM's forward-mode JVP alike, and the run
    is the eager run, bitwise."""
    config = run_yaml(tmp_path, "sd3", parallel="fsdp2")
    worker = Path(__file__).with_name("compile_fsdp2_worker.py")
    proc = _torchrun(str(worker), config, str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))["ranks"]
    for r in ranks:
        for method in ("dmd2", "scm"):
            got = r[method]
            assert got["compiled_blocks"] == got["blocks"] > 0, (method, got)
            assert 0 < got["graphs"] <= BLOCK_VARIANTS, (method, got)
            assert got["compiled_vs_eager"] == [], (method, got)
