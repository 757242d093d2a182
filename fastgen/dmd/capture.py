"""Teacher features for the GAN branch, returned by the call that produced them.

:func:`attach_feature_capture` installs forward hooks on the tapped blocks once. They write only
while :meth:`FeatureCapture.run` is running a call, into a list made for that call, which
``run`` returns with the call's output: no list to drain between calls, no stale features from
an earlier call, and an error when a tapped block did not run. Hooks and the per-call list trace
into one graph under ``torch.compile`` (Dynamo inlines module hooks and replays the list's
mutations), and the hooks are plain module hooks, so FSDP2 and activation checkpointing see
nothing unusual (a recomputation in backward runs outside ``run`` and writes nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = [
    "FeatureCapture",
    "attach_feature_capture",
    "feature_capture_of",
    "remove_feature_capture",
]

_ATTR = "_fastgen_feature_capture"


class FeatureCapture:
    """Hooks on a model's tapped blocks; :meth:`run` returns a call's output and features.

    Made by :func:`attach_feature_capture`.
    """

    def __init__(
        self,
        model: nn.Module,
        taps: Sequence[str | int],
        *,
        blocks: str | None = None,
        output_index: int | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if isinstance(taps, (str, int)) or len(taps) == 0:
            raise ValueError(
                f"taps must be a non-empty list of block names or indices, got {taps!r}"
            )
        self.names: list[str] = []
        for tap in taps:
            if isinstance(tap, bool) or not isinstance(tap, (str, int)):
                raise TypeError(f"each tap must be a module name or an int index, got {tap!r}")
            if isinstance(tap, int):
                if blocks is None:
                    raise ValueError(
                        f"tap {tap} is an index: name the ModuleList it indexes with blocks="
                    )
                self.names.append(f"{blocks}.{tap}")
            else:
                self.names.append(tap)
        self.output_index = output_index
        self.transform = transform
        self._sink: list[Tensor | None] | None = None
        self._handles = []
        modules = dict(model.named_modules())
        for i, name in enumerate(self.names):
            if name not in modules:
                raise ValueError(f"tap {name!r} is not a submodule of the model")
            self._handles.append(modules[name].register_forward_hook(self._hook(i)))

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            sink = self._sink
            if sink is None:  # a call outside run(): nothing is kept
                return
            if self.output_index is not None:
                output = output[self.output_index]
            if self.transform is not None:
                output = self.transform(output)
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"tapped block {self.names[i]!r} returned {type(output).__name__}; set "
                    "output_index to pick the tensor out of its output"
                )
            sink[i] = output

        return hook

    def run(self, call: Callable[[], Any]) -> tuple[Any, list[Tensor]]:
        """Run ``call()`` (one model call) and return ``(its output, the tapped features)``.

        Raises:
            RuntimeError: A tapped block did not run during the call, or ``run`` is nested.
        """
        if self._sink is not None:
            raise RuntimeError("FeatureCapture.run is already running: calls cannot nest")
        sink: list[Tensor | None] = [None] * len(self.names)
        self._sink = sink
        try:
            out = call()
        finally:
            self._sink = None
        missing = [name for name, f in zip(self.names, sink) if f is None]
        if missing:
            raise RuntimeError(f"tapped blocks {missing} did not run during the model call")
        return out, sink

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attach_feature_capture(
    model: nn.Module,
    taps: Sequence[str | int],
    *,
    blocks: str | None = None,
    output_index: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> FeatureCapture:
    """Tap blocks of ``model`` (the teacher) for the discriminator.

    Args:
        model: The teacher.
        taps: Submodule names (``"transformer_blocks.3"``) or indices into the ``blocks``
            ModuleList; features come back in this order.
        blocks: Name of the ModuleList that integer taps index (``"transformer_blocks"``).
        output_index: For blocks that return a tuple, which element is the feature (diffusers'
            SD3/Flux joint blocks return ``(encoder_hidden_states, hidden_states)``: use 1).
        transform: Applied to each captured feature (for example tokens ``[B, N, C]`` to a
            grid ``[B, C, h, w]``, :func:`fastgen.plugins.qwen_image.attach_feature_capture`).

    Returns:
        The capture; :class:`~fastgen.dmd.DMDPipeline` finds it on the teacher.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> capture = attach_feature_capture(net, taps=[0, 1], blocks="")
        Traceback (most recent call last):
        ...
        ValueError: tap '.0' is not a submodule of the model
        >>> capture = attach_feature_capture(net, taps=["0", "1"])
        >>> out, feats = capture.run(lambda: net(torch.ones(4, 2)))
        >>> [f.shape for f in feats]
        [torch.Size([4, 3]), torch.Size([4, 3])]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    previous = feature_capture_of(model)
    if previous is not None:
        previous.remove()
    capture = FeatureCapture(
        model, taps, blocks=blocks, output_index=output_index, transform=transform
    )
    object.__setattr__(model, _ATTR, capture)
    return capture


def feature_capture_of(model: nn.Module) -> FeatureCapture | None:
    """The capture attached to ``model`` (looking through DDP/compile wrappers), or ``None``."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        capture = getattr(m, _ATTR, None) if m is not None else None
        if capture is not None:
            return capture
    return None


def remove_feature_capture(model: nn.Module) -> None:
    """Remove the capture attached to ``model`` (its hooks and the reference); a no-op when
    there is none."""
    capture = feature_capture_of(model)
    if capture is None:
        return
    capture.remove()
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if m is not None and getattr(m, _ATTR, None) is capture:
            object.__delattr__(m, _ATTR)
