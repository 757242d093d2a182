"""fastgen.eval.frechet: the closed form on Gaussians, scipy's sqrtm formula, torchmetrics' FID."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from fastgen.eval import frechet_distance, gaussian_stats, stats_frechet_distance


def _random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(d, d, dtype=torch.float64, generator=g)
    return m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_diagonal_gaussians_closed_form():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(5, generator=g).double(), torch.randn(5, generator=g).double()
    var_a, var_b = torch.rand(5, generator=g).double() + 0.5, torch.rand(5, generator=g).double()
    expected = ((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    got = stats_frechet_distance(mu_a, var_a.diag(), mu_b, var_b.diag())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_general_covariances_match_scipy_sqrtm_formula():
    # pytorch-fid's / clean-fid's formula: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 sqrtm(Sa Sb)).
    g = torch.Generator().manual_seed(1)
    mu_a, mu_b = torch.randn(6, dtype=torch.float64, generator=g), torch.zeros(6).double()
    cov_a, cov_b = _random_spd(6, g), _random_spd(6, g)
    root = scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    diff = (mu_a - mu_b).numpy()
    expected = diff @ diff + np.trace(cov_a.numpy() + cov_b.numpy() - 2 * root)
    got = stats_frechet_distance(mu_a, cov_a, mu_b, cov_b)
    assert abs(float(got) - expected) < 1e-9 * abs(expected)


def test_feature_sets_agree_with_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(torch.nn.Module):  # the features themselves, as torchmetrics' feature net
        num_features = 16

        def forward(self, x):
            return x.flatten(1).double()

    g = torch.Generator().manual_seed(2)
    real = torch.rand(200, 16, generator=g)
    fake = torch.rand(150, 16, generator=g) * 0.8 + 0.15
    metric = FrechetInceptionDistance(feature=Features(), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.testing.assert_close(
        frechet_distance(real, fake), metric.compute(), rtol=1e-9, atol=1e-12
    )


def test_sample_gaussians_converge_to_the_population_distance():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200_000, 2, dtype=torch.float64, generator=g)
    b = torch.randn(200_000, 2, dtype=torch.float64, generator=g) * 2.0 + torch.tensor([1.0, 0.0])
    # population: |(1, 0)|^2 + 2 * (1 - 2)^2 = 3
    assert abs(float(frechet_distance(a, b)) - 3.0) < 0.05


def test_gaussian_stats_are_unbiased_float64():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 1.0]])
    mu, cov = gaussian_stats(x)
    assert mu.dtype == cov.dtype == torch.float64
    torch.testing.assert_close(cov, torch.cov(x.double().T))
    torch.testing.assert_close(mu, torch.tensor([3.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("a", "b", "error", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), ValueError, "different feature widths"),
        (torch.zeros(1, 3), torch.zeros(4, 3), ValueError, "at least 2 samples"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), TypeError, "floating-point"),
        (torch.zeros(4), torch.zeros(4, 1), TypeError, r"\[N, D\]"),
    ],
)
def test_bad_features_name_the_argument(a, b, error, match):
    with pytest.raises(error, match=match):
        frechet_distance(a, b)
