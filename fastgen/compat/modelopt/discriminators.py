"""``modelopt.torch.fastgen.discriminators``: FastGen's image-DiT discriminator under modelopt's
names (:class:`fastgen.plugins.qwen_image.ImageDiTDiscriminator`)."""

from __future__ import annotations

from torch import Tensor, nn

from fastgen.plugins.qwen_image import ImageDiTDiscriminator

__all__ = ["Discriminator", "Discriminator_ImageDiT"]


class Discriminator(nn.Module):
    """The base of modelopt's discriminators: the teacher blocks whose features it reads."""

    def __init__(self, feature_indices: set[int] | None = None) -> None:
        super().__init__()
        self.feature_indices = feature_indices

    def forward(self, feats: list[Tensor]) -> Tensor:
        raise NotImplementedError("a Discriminator subclass implements forward()")


class Discriminator_ImageDiT(ImageDiTDiscriminator, Discriminator):
    """One conv head per tapped block (``feature_indices``, by default the middle of
    ``num_blocks``; indices past ``num_blocks`` are dropped), on features
    ``[B, inner_dim, H, W]``; logits ``[B, num_heads]``.

    Raises:
        ValueError: ``forward`` gets anything but a list of one tensor per head.
    """

    def __init__(
        self,
        feature_indices: set[int] | None = None,
        num_blocks: int = 57,
        inner_dim: int = 3072,
    ) -> None:
        indices = {num_blocks // 2} if feature_indices is None else set(feature_indices)
        indices = {i for i in indices if i < num_blocks}
        super().__init__(inner_dim=inner_dim, num_heads=len(indices))
        self.feature_indices = indices
        self.num_features = len(indices)

    def forward(self, feats: list[Tensor]) -> Tensor:
        if not isinstance(feats, list):
            raise ValueError(
                f"expected a list of {self.num_features} feature tensors, got "
                f"{type(feats).__name__}"
            )
        return super().forward(feats)
