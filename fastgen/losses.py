r"""DMD2 losses: denoising score matching for the fake score, distribution matching for the
generator, and the GAN terms (generator, discriminator, approximate R1).

Each is computed in the precision policy's dtype (float64 by default) and rounded once
(:func:`fastgen.precision.compute_once`) to a 0-d tensor in the dtype of its first argument;
each compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.checks import check_float_tensor, check_pair, check_t, expand_like
from fastgen.precision import compute_once
from fastgen.pred_type import Param, check_param

__all__ = ["VSD_WEIGHT_EPS", "dsm_loss", "gan_disc_loss", "gan_gen_loss", "r1_loss", "vsd_loss"]

# DMD2's guard on the per-sample normaliser mean |gen - teacher_x0|.
VSD_WEIGHT_EPS = 1e-6


def dsm_loss(pred: Tensor, *, x0: Tensor, eps: Tensor, t: Tensor, pred_type: Param) -> Tensor:
    r"""Denoising score matching: mean squared error against the target of ``pred_type``.

    .. math::

        \mathcal{L} = \operatorname{mean}\big((\hat y - y)^2\big), \qquad
        y = \begin{cases} x_0 & \text{x0} \\ \epsilon & \text{eps} \\ \epsilon - x_0 & \text{flow} \end{cases}

    The weighting is uniform in t (DMD2's fake-score loss); ``t`` is validated against the
    data (broadcastable, in [0, 1] in eager mode) so a mismatched batch fails loudly.

    Args:
        pred: The network's prediction at ``x_t = add_noise(x0, eps, t)``, shape ``[B, ...]``.
        x0: Clean samples the noisy input was made from, same shape.
        eps: The noise it was made with, same shape.
        t: Timesteps, shape ``[]``, ``[B]`` or a prefix of the data shape.
        pred_type: ``"x0"``, ``"eps"`` or ``"flow"``.

    Returns:
        A 0-d tensor in ``pred``'s dtype (computed in the policy's dtype, rounded once).

    Example:
        >>> import torch
        >>> x0, eps = torch.zeros(2, 3), torch.ones(2, 3)
        >>> dsm_loss(torch.ones(2, 3), x0=x0, eps=eps, t=torch.rand(2), pred_type="flow")
        tensor(0.)
    """
    check_param("pred_type", pred_type)
    check_pair("pred", pred, "x0", x0)
    check_pair("pred", pred, "eps", eps)
    check_t(t, pred)

    def mse(pred: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
        target = x0 if pred_type == "x0" else eps if pred_type == "eps" else eps - x0
        return torch.mean((pred - target) ** 2)

    return compute_once(mse, pred, x0, eps, dtype=pred.dtype)


def vsd_loss(
    gen: Tensor, teacher_x0: Tensor, fake_x0: Tensor, additional_scale: Tensor | None = None
) -> Tensor:
    r"""DMD2's distribution-matching gradient, written as a loss on the generator output.

    Without gradient: a per-sample weight and the score difference,

    .. math::

        w = \frac{1}{\operatorname{mean}|g - \hat x_0^{\text{real}}| + 10^{-6}}, \qquad
        \Delta = (\hat x_0^{\text{fake}} - \hat x_0^{\text{real}})\, w,

    then :math:`\mathcal{L} = \tfrac12 \operatorname{mean}\big((g - \operatorname{sg}(g - \Delta))^2\big)`,
    so :math:`\partial \mathcal{L} / \partial g = \Delta / \text{numel}`. An
    ``additional_scale`` ``[B]`` multiplies each sample's weight :math:`w`. The weight and
    :math:`\Delta` are computed in float64 (the DMD2 reference uses float32; float64 only
    removes round-off).

    Args:
        gen: Generator output :math:`g`, shape ``[B, ...]`` with at least 2 dims.
        teacher_x0: The real (teacher) score's x0 prediction at a noised ``gen``, same shape.
        fake_x0: The fake score's x0 prediction at the same input, same shape.
        additional_scale: Optional per-sample multiplier of the weight, shape ``[B]``.

    Returns:
        A 0-d tensor in ``gen``'s dtype; only ``gen`` receives gradient.

    Example:
        >>> import torch
        >>> gen = torch.zeros(1, 2, requires_grad=True)
        >>> vsd_loss(gen, torch.ones(1, 2), torch.full((1, 2), 3.0)).backward()
        >>> torch.allclose(gen.grad, torch.ones(1, 2))  # (3 - 1) / mean|0 - 1| / numel
        True
    """
    check_pair("gen", gen, "teacher_x0", teacher_x0)
    check_pair("gen", gen, "fake_x0", fake_x0)
    if gen.ndim < 2:
        raise ValueError(
            f"gen must have a batch dim and data dims (ndim >= 2), got {tuple(gen.shape)}"
        )
    scale = ()
    if additional_scale is not None:
        check_float_tensor("additional_scale", additional_scale)
        scale = (expand_like(additional_scale.detach(), gen),)

    def vsd(gen: Tensor, teacher_x0: Tensor, fake_x0: Tensor, *scale: Tensor) -> Tensor:
        with torch.no_grad():
            norm = (
                (gen.detach() - teacher_x0).abs().mean(dim=tuple(range(1, gen.ndim)), keepdim=True)
            )
            grad = (fake_x0 - teacher_x0) / (norm + VSD_WEIGHT_EPS)
            if scale:
                grad = grad * scale[0]
            target = gen.detach() - grad
        return 0.5 * torch.mean((gen - target) ** 2)

    return compute_once(vsd, gen, teacher_x0.detach(), fake_x0.detach(), *scale, dtype=gen.dtype)


def _check_logits(name: str, logits: object) -> None:
    check_float_tensor(name, logits)
    if logits.ndim != 2:
        raise ValueError(f"{name} must be 2-D [B, n_heads], got shape {tuple(logits.shape)}")


def gan_gen_loss(fake_logits: Tensor) -> Tensor:
    r"""Non-saturating GAN loss of the generator.

    .. math::

        \mathcal{L}_G = \operatorname{mean}\ \operatorname{softplus}(-D_{\text{fake}})

    Args:
        fake_logits: Discriminator logits on generated samples, ``[B, n_heads]``.

    Returns:
        A 0-d tensor in ``fake_logits``' dtype (computed in the policy's dtype, rounded once).

    Example:
        >>> import torch
        >>> round(float(gan_gen_loss(torch.zeros(2, 1))), 6)  # log 2
        0.693147
    """
    _check_logits("fake_logits", fake_logits)
    return compute_once(lambda d: F.softplus(-d).mean(), fake_logits, dtype=fake_logits.dtype)


def gan_disc_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    r"""GAN loss of the discriminator.

    .. math::

        \mathcal{L}_D = \operatorname{mean}\ \operatorname{softplus}(D_{\text{fake}})
        + \operatorname{mean}\ \operatorname{softplus}(-D_{\text{real}})

    Args:
        real_logits: Logits on (noised) real samples, ``[B, n_heads]``.
        fake_logits: Logits on (noised) generated samples, ``[B', n_heads]``.

    Returns:
        A 0-d tensor in ``real_logits``' dtype (computed in the policy's dtype, rounded once).

    Example:
        >>> import torch
        >>> round(float(gan_disc_loss(torch.zeros(2, 1), torch.zeros(2, 1))), 6)  # 2 log 2
        1.386294
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    return compute_once(
        lambda real, fake: F.softplus(fake).mean() + F.softplus(-real).mean(),
        *(real_logits, fake_logits),
        dtype=real_logits.dtype,
    )


def r1_loss(real_logits: Tensor, real_logits_perturbed: Tensor) -> Tensor:
    r"""Approximate R1 penalty (APT; FastGen's and modelopt's form).

    .. math::

        \mathcal{L}_{R1} = \operatorname{mean}\big((D(x) - D(x + \alpha z))^2\big)

    a finite-difference stand-in for the gradient norm of the discriminator on real data.

    Args:
        real_logits: Logits on real data, ``[B, n_heads]``.
        real_logits_perturbed: Logits on the same data plus ``alpha * N(0, 1)``, same shape.

    Returns:
        A 0-d tensor in ``real_logits``' dtype (computed in the policy's dtype, rounded once).

    Example:
        >>> import torch
        >>> r1_loss(torch.ones(2, 1), torch.zeros(2, 1))
        tensor(1.)
    """
    _check_logits("real_logits", real_logits)
    _check_logits("real_logits_perturbed", real_logits_perturbed)
    check_pair("real_logits", real_logits, "real_logits_perturbed", real_logits_perturbed)
    return compute_once(
        lambda real, perturbed: torch.mean((real - perturbed) ** 2),
        *(real_logits, real_logits_perturbed),
        dtype=real_logits.dtype,
    )
