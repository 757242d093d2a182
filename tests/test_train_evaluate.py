"""fastgen sample --pipeline and fastgen eval on a tiny SD3 pipeline folder: decoded PNGs,
eval.json with every figure, feature networks from local files, bad inputs in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from families import clip_tokenizer, save_sd3_pipeline
from PIL import Image
from torch import nn

from fastgen.cli import main
from fastgen.dmd.config import DMDConfig
from fastgen.eval.features import sha256
from fastgen.train.evaluate import load_pipeline, load_student, sample_student
from fastgen.train.folders import export_student

LADDER = [0.999, 0.5, 0.0]


class Features(nn.Module):
    """A random feature network of FID's convention (uint8 pictures in, features out)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255.0).mean(dim=(2, 3))


# the module fixture built once: the file's tests on one xdist worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("train_evaluate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("eval")
    pipeline = save_sd3_pipeline(root)
    pipe = load_pipeline(pipeline)
    dmd = DMDConfig(student_sample_steps=2, sample_t_cfg={"t_list": LADDER})
    export = export_student(pipe.transformer, root / "run", dmd)
    torch.manual_seed(0)
    weights = root / "features.pt"
    torch.jit.script(Features()).save(str(weights))
    clip = root / "clip"
    text = dict(vocab_size=54, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=6)).save_pretrained(
        clip
    )
    clip_tokenizer(clip).save_pretrained(clip)
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    return {"root": root, "pipeline": pipeline, "export": export, "weights": weights,
            "clip": clip, "prompts": prompts}  # fmt: skip


def test_sample_with_a_pipeline_writes_rgb_pngs_equal_to_decoding_the_latents(
    setup, tmp_path, capsys
):
    out = tmp_path / "pictures"
    code = main(["sample", "--student", str(setup["export"] / "transformer"), "--pipeline",
                 str(setup["pipeline"]), "--prompts", str(setup["prompts"]), "--samples", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0 and "wrote 3 pictures (16x16)" in capsys.readouterr().out
    files = sorted(out.glob("sample_0*.png"))
    assert len(files) == 3 and (out / "sample_grid.png").is_file()
    pictures = [Image.open(f) for f in files]
    assert all(p.mode == "RGB" and p.size == (16, 16) for p in pictures)
    # The same student run by hand: its latents decoded by the pipeline's VAE, as uint8.
    pipe = load_pipeline(setup["pipeline"])
    student, settings = load_student(setup["export"], pipe)
    images, noise, _ = sample_student(student, settings, pipe, ["a cat", "a dog", "a cat"],
                                      resolution=16)  # fmt: skip
    assert noise.shape == (3, 4, 8, 8)
    expected = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    for picture, want in zip(pictures, expected):
        assert torch.equal(torch.from_numpy(np.array(picture)).permute(2, 0, 1), want)


def test_eval_writes_every_figure_for_student_and_teacher(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--student", str(setup["export"]), "--pipeline", str(setup["pipeline"]),
                 "--prompts", str(setup["prompts"]), "--out", str(out), "--metrics",
                 "clip,diversity,fid", "--clip", str(setup["clip"]), "--fid-weights",
                 str(setup["weights"]), "--seeds", "2", "--teacher-steps", "2"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    result = json.loads((out / "eval.json").read_text())
    student, teacher = result["student"], result["teacher"]
    for key in ("clip_score", "clip_cosine", "diversity", "vendi", "seconds_per_image"):
        assert key in student and key in teacher
    assert {"fid_to_teacher", "diversity_ratio"} <= student.keys()
    assert 0.0 <= student["clip_score"] <= 100.0 and 1.0 <= student["vendi"] <= 2.0
    assert student["images"] == teacher["images"] == 4
    paired = result["paired"]
    assert {"psnr_db", "feature_distance", "clip_score_difference"} <= paired.keys()
    assert paired["psnr_db"]["low"] <= paired["psnr_db"]["mean"] <= paired["psnr_db"]["high"]
    assert result["features"]["fid"]["sha256"] == sha256(setup["weights"])
    assert result["features"]["clip"]["sha256"] == sha256(setup["clip"])
    assert result["features"]["clip"]["clip_score"] == "100 * max(cos(image, text), 0)"
    assert (out / "report.md").read_text().count("![") == 2
    assert Image.open(out / "teacher" / "teacher_grid.png").size == (32, 32)  # 2 seeds x 2 prompts


def test_eval_with_a_reference_folder_and_no_teacher(setup, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(reference / f"{i}.png")
    out = tmp_path / "eval"
    assert main(["eval", "--student", str(setup["export"]), "--pipeline", str(setup["pipeline"]),
                 "--prompts", str(setup["prompts"]), "--out", str(out), "--metrics", "fid",
                 "--fid-weights", str(setup["weights"]), "--reference", str(reference),
                 "--seeds", "2", "--no-teacher"]) == 0  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    assert "teacher" not in result and result["student"]["fid"] >= 0.0
    assert "fid_to_teacher" not in result["student"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--fid-weights": "missing.pt"}, "--fid-weights: no file"),
        (
            {"--fid-weights": "missing.pt", "--fid-sha256": "ab12"},
            "missing.pt' (expected sha256 ab12)",
        ),
        ({"--fid-sha256": "0" * 64}, "features.pt has sha256"),
        ({"--clip": "missing-clip"}, "--clip: no file"),
        ({"--prompts": "empty.txt"}, "holds no prompt"),
        ({"--student": "mismatched"}, "not the student of this pipeline"),
        ({"--metrics": "clip,fud"}, "--metrics: unknown fud"),
        ({"--seeds": "1"}, "diversity needs --seeds >= 2"),
    ],
)
def test_eval_bad_inputs_are_one_line_exit_2(setup, tmp_path, capsys, change, message):
    import diffusers
    from families import SD3

    (tmp_path / "empty.txt").write_text("\n")
    mismatched = tmp_path / "mismatched"
    if "mismatched" in change.values():
        net = diffusers.SD3Transformer2DModel(**dict(SD3, in_channels=8, out_channels=8))
        export_student(
            net, mismatched, DMDConfig(student_sample_steps=2, sample_t_cfg={"t_list": LADDER})
        )
    args = {"--student": str(setup["export"]), "--pipeline": str(setup["pipeline"]),
            "--prompts": str(setup["prompts"]), "--out": str(tmp_path / "out"),
            "--metrics": "clip,diversity,fid", "--clip": str(setup["clip"]),
            "--fid-weights": str(setup["weights"]), "--seeds": "2", "--teacher-steps": "1"}  # fmt: skip
    for key, value in change.items():
        args[key] = (
            str(tmp_path / value) if key in ("--fid-weights", "--clip", "--prompts") else value
        )
    if change.get("--student") == "mismatched":
        args["--student"] = str(mismatched / "export")
    code = main(["eval", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_sweep_scores_each_checkpoints_ema_student_once(setup, tmp_path, capsys):
    import yaml

    from fastgen.checkpoint import load_ema_weights
    from fastgen.train.folders import load_model

    run = {"out": str(tmp_path / "run"), "steps": 2, "recipe": "dmd2_sd3",
           "teacher": {"path": str(setup["pipeline"]), "subfolder": "transformer"},
           "dmd": {"gan_loss_weight_gen": 0.0, "student_update_freq": 1, "ema": {"decay": 0.5}},
           "data": "train_toys:sd3_data", "checkpoint": {"every": 1, "keep": None},
           "log": {"progress": False}}  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    assert main(["distill", str(config)]) == 0
    # the last checkpoint's EMA shadows are the exported student, bit for bit
    exported = load_model(tmp_path / "run" / "export" / "transformer")
    net = load_model(setup["pipeline"], subfolder="transformer")
    from fastgen.dmd.config import EMAConfig

    load_ema_weights(tmp_path / "run" / "checkpoints" / "step_00000002", net, EMAConfig(decay=0.5))
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), exported.state_dict().values())
    )
    args = ["eval", "--checkpoints", str(tmp_path / "run" / "checkpoints"), "--pipeline",
            str(setup["pipeline"]), "--prompts", str(setup["prompts"]), "--out",
            str(tmp_path / "sweep"), "--metrics", "diversity,fid", "--fid-weights",
            str(setup["weights"]), "--seeds", "2", "--teacher-steps", "1"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    assert "2 checkpoints, 2 scored now" in capsys.readouterr().out
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sorted(summary["checkpoints"]) == ["step_00000001", "step_00000002"]
    assert all(
        "diversity_ratio" in v and "fid_to_teacher" in v for v in summary["checkpoints"].values()
    )
    assert main(args) == 0 and "2 checkpoints, 0 scored now" in capsys.readouterr().out
