"""The demo's pieces against exact answers, and one --quick run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from fastgen import demo
from fastgen.timesteps import make_t_list


def test_sliced_wasserstein_zero_for_equal_sets_and_shift_for_translation():
    projections = torch.randn(2, 64)
    projections /= projections.norm(dim=0, keepdim=True)
    a = torch.randn(500, 2)
    assert demo.sliced_wasserstein(a, a[torch.randperm(500)], projections) == 0.0
    # translating by d moves each 1-D marginal by <d, p>: SWD = sqrt(mean <d, p>^2)
    d = torch.tensor([0.3, -0.4])
    expected = float(((d @ projections.double().float()) ** 2).mean().sqrt())
    assert abs(demo.sliced_wasserstein(a + d, a, projections) - expected) < 1e-6


def test_modes_covered_counts_modes():
    data = demo.sample_data(8192, torch.device("cpu"))
    assert demo.modes_covered(data) == demo.N_MODES
    one_mode = demo.mode_centers(torch.device("cpu"))[3] + demo.MODE_STD * torch.randn(1000, 2)
    assert demo.modes_covered(one_mode) == 1
    assert demo.modes_covered(torch.zeros(100, 2)) == 0


def test_samplers_follow_the_exact_flow_of_a_point_mass():
    # For data = {c}, the exact velocity is v(x, t) = (x - c) / t: every sampler lands on c.
    c = torch.tensor([1.5, -0.5])
    exact_flow = lambda x, t: (x - c) / t[:, None]  # noqa: E731
    exact_x0 = lambda x, t: x - t[:, None] * exact_flow(x, t)  # flow model's x0 readout  # noqa: E731
    eps = torch.randn(64, 2)
    ladder = [1.0 - i / 10 for i in range(10)] + [0.0]
    torch.testing.assert_close(
        demo.euler_ode(exact_flow, eps, ladder), c.expand(64, 2), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        demo.student_sample(exact_flow, eps, make_t_list(4)), c.expand(64, 2), rtol=0, atol=1e-5
    )
    assert exact_x0(eps, torch.ones(64)).allclose(c.expand(64, 2), atol=1e-6)


def test_quick_run_writes_files_and_beats_the_one_step_baseline(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fastgen.demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "teacher_multistep_swd",
        "teacher_onestep_swd",
        "student_onestep_swd",
        "student_multistep_swd",
        "student_modes_covered",
        "n_modes",
        "seconds",
        "compiled",
    ):
        assert key in metrics
    assert metrics["compiled"] is True and metrics["n_modes"] == 8
    assert metrics["student_onestep_swd"] < metrics["teacher_onestep_swd"]
    assert metrics["student_multistep_swd"] < metrics["teacher_onestep_swd"]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sliced W2" in proc.stdout
