"""fastgen's own exception types."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded as asked: a damaged, missing or altered file,
    or state that does not match the live networks. The message names the file or the key."""
