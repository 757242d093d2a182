"""modelopt's own unit tests for ``modelopt.torch.fastgen``, run against fastgen.

The tests are NVIDIA Model Optimizer's (``tests/unit/torch/fastgen`` of NVIDIA/Model-Optimizer,
not copied here): ``FASTGEN_MODELOPT_TESTS`` names the folder that holds them, and without it
this file is skipped. They run in a child pytest whose only addition is the plugin
``modelopt_alias``: ``modelopt.torch.fastgen[.X]`` is the module ``fastgen.compat.modelopt[.X]``
and nothing of an installed modelopt is imported. Every test must pass except the ones in
:data:`EXCLUDED`, each with its reason (the README and the modelopt guide list the same).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SUITE = os.environ.get("FASTGEN_MODELOPT_TESTS")

EXCLUDED = {
    "test_dmd_math.py::test_backward_simulation_selected_rung_is_broadcast": (
        "patches modelopt's torch.distributed broadcast of one rung for the whole batch; "
        "fastgen draws a rung per sample with no collective"
    ),
    "test_dmd_math.py::test_classifier_free_guidance_matches_fastgen": (
        "torch.equal with the float32 formula cond + (s - 1)(cond - uncond); fastgen computes "
        "it in float64 and rounds once"
    ),
    "test_pred_type_conversion.py::test_student_vsd_sees_x0_not_raw_flow": (
        "compares the fake score's x0 passed to vsd_loss with a float32 tensor; fastgen passes "
        "the float64 x0, unrounded (its value agrees to 1e-6)"
    ),
    "test_qwen_image_plugin.py::test_call_model_forwards_qwen_kwargs": (
        "expects txt_seq_lens read from the mask on the host (.tolist()) and one img_shapes entry "
        "per sample; fastgen derives nothing on the host and passes one shared entry"
    ),
}


def outcomes(report: Path) -> dict[str, str]:
    """``file::test -> passed | failed | skipped`` from a JUnit XML report."""
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped"
        result[f"{module}.py::{case.get('name')}"] = status
    return result


@pytest.mark.skipif(SUITE is None, reason="FASTGEN_MODELOPT_TESTS is not set")
def test_modelopt_suite_passes_through_the_alias(tmp_path):
    suite = Path(SUITE)
    assert (suite / "conftest.py").is_file(), f"{suite} holds no modelopt fastgen tests"
    report = tmp_path / "report.xml"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "modelopt_alias", "-p", "no:cacheprovider"]
    cmd += ["-c", os.devnull, "--rootdir", str(suite), f"--junitxml={report}", str(suite)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert report.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    results = outcomes(report)
    failed = sorted(name for name, status in results.items() if status == "failed")
    passed = [name for name, status in results.items() if status == "passed"]
    print(f"modelopt's suite through the alias: {len(passed)} passed, {len(failed)} failed")
    assert len(results) == 40, sorted(results)
    assert set(failed) <= set(EXCLUDED), sorted(set(failed) - set(EXCLUDED))
    assert len(passed) >= 40 - len(EXCLUDED)
