"""Benchmark sizes and shared measurements.

Full run: ``python -m pytest bench --benchmark-json bench/results/cpu.json`` (several minutes).
Smoke mode (CI): ``python -m pytest bench --benchmark-disable``: tiny sizes, every benchmark
body runs once, nothing is timed.
"""

from __future__ import annotations

import pytest
import torch

import fastgen

# Elements per tensor: launch-bound to bandwidth-bound.
CPU_SIZES = [4096, 1 << 20, 1 << 24]
GPU_SIZES = [4096, 1 << 20, 1 << 24, 1 << 27]  # 2^27 bf16 = 256 MiB, fp32 = 512 MiB
SMOKE_SIZES = [4096]


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu")


def smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


def pytest_generate_tests(metafunc):
    if "numel" in metafunc.fixturenames:
        config = metafunc.config
        if smoke(config):
            sizes = SMOKE_SIZES
        elif config.getoption("bench_device").startswith("cuda"):
            sizes = GPU_SIZES
        else:
            sizes = CPU_SIZES
        metafunc.parametrize("numel", sizes, ids=lambda n: f"n{n}")


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.getoption("bench_device"))


@pytest.fixture(scope="session")
def is_smoke(pytestconfig) -> bool:
    return smoke(pytestconfig)


@pytest.fixture(autouse=True)
def _no_eager_value_checks():
    # Benchmarks time the math, not the optional eager host sync on t.
    previous = fastgen.set_value_checks(False)
    yield
    fastgen.set_value_checks(previous)


@pytest.fixture(scope="session")
def medians() -> dict:
    """Median seconds of earlier benchmarks in this run, keyed by name: ratios come from one run."""
    return {}


@pytest.fixture(autouse=True)
def _stamp(request, device):
    """Every result carries the torch version and the device it ran on."""
    if "benchmark" in request.fixturenames:
        benchmark = request.getfixturevalue("benchmark")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        benchmark.extra_info.update(torch=torch.__version__, device_name=name)
