"""Wrap a model so that one forward pass returns its output and last-layer features."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn

from laplace.utils.enums import FeatureReduction, parse_enum


class FeatureExtractor(nn.Module):
    """Expose the input of a model's last ``nn.Linear`` layer.

    Parameters
    ----------
    model : nn.Module
        the network; its output must be the output of the last-layer ``nn.Linear``.
    last_layer_name : str, optional
        the name of the last layer in ``model.named_modules()``; when omitted, it is
        found on the first forward pass as the ``nn.Linear`` that produced the output.
    enable_backprop : bool, default=False
        keep the graph of the features (for gradients with respect to the input).
    feature_reduction : FeatureReduction or str, optional
        how to reduce features of shape ``(batch, seq_len, dim)`` to ``(batch, dim)``
        (``pick_first``, ``pick_last`` or ``average``). With a mapping batch that
        holds an ``attention_mask`` ``(batch, seq_len)``, ``pick_last`` picks the
        last position the mask keeps (the last token that is not padding, as
        Hugging Face's sequence classifiers do), whichever side is padded.
    """

    #: key of the attention mask in mapping batches
    mask_key = "attention_mask"

    def __init__(
        self,
        model: nn.Module,
        last_layer_name: str | None = None,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.enable_backprop = enable_backprop
        self.feature_reduction = (
            None
            if feature_reduction is None
            else parse_enum(FeatureReduction, feature_reduction, "feature_reduction")
        )
        self.last_layer_name: str | None = None
        self.last_layer: nn.Linear | None = None
        if last_layer_name is not None:
            self.set_last_layer(last_layer_name)

    def set_last_layer(self, last_layer_name: str) -> None:
        modules = dict(self.model.named_modules())
        if last_layer_name not in modules:
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"last_layer_name={last_layer_name!r} is not a module of the model; "
                f"its nn.Linear modules are {linear}."
            )
        layer = modules[last_layer_name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"The last layer {last_layer_name!r} is a {type(layer).__name__}; "
                "last-layer Laplace needs an nn.Linear."
            )
        self.last_layer_name, self.last_layer = last_layer_name, layer

    def forward(
        self, x: torch.Tensor | MutableMapping[str, Any], **model_kwargs: Any
    ) -> torch.Tensor:
        """The model's outputs (the last layer is found if it is not known yet)."""
        if self.last_layer is None:
            return self.find_last_layer(x, **model_kwargs)[0]
        return self.model(x, **model_kwargs)

    def forward_with_features(
        self,
        x: torch.Tensor | MutableMapping[str, Any],
        reduce: bool = True,
        **model_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(outputs, features)``; the features are the last layer's input,
        reduced to ``(batch, dim)`` by ``feature_reduction`` (unless ``reduce`` is
        False). The last layer is found on the first call when it was not named.
        ``model_kwargs`` go to the model's forward."""
        if self.last_layer is None:
            out, features = self.find_last_layer(x, **model_kwargs)
        else:
            captured: list[torch.Tensor] = []
            handle = self.last_layer.register_forward_hook(
                lambda _m, inputs, _out: captured.append(inputs[0])
            )
            try:
                out = self.model(x, **model_kwargs)
            finally:
                handle.remove()
            if not captured:
                raise RuntimeError(
                    f"The last layer {self.last_layer_name!r} was not called in the "
                    "forward pass (or not as a module): name the nn.Linear that "
                    "produces the outputs with last_layer_name=..."
                )
            features = captured[-1]
        if not self.enable_backprop:
            features = features.detach()
        if not reduce:
            return out, features
        return out, self.reduce_features(features, self._attention_mask(x))

    def _attention_mask(self, x: Any) -> torch.Tensor | None:
        if isinstance(x, MutableMapping) and self.mask_key in x:
            return x[self.mask_key]
        return None

    def find_last_layer(
        self, x: torch.Tensor | MutableMapping[str, Any], **model_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Find the last layer in a forward pass of ``x``; return ``(outputs,
        unreduced features)``.

        It is the ``nn.Linear`` whose output is the model's output or, failing that,
        the last one called of which the output is a view (squeezed, reshaped or
        sliced, e.g. the last position of a sequence) or, failing that, the last one
        called with the outputs' batch size and number of outputs whose result the
        model gathers per datum (e.g. the ``score`` head of Hugging Face's
        sequence classifiers, applied at every position, of which the model keeps
        the last token's); otherwise name it.
        """
        calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        handles = [
            m.register_forward_hook(
                lambda _m, inputs, out, name=name: calls.append((name, inputs[0], out))
            )
            for name, m in self.model.named_modules()
            if isinstance(m, nn.Linear)
        ]
        try:
            out = self.model(x, **model_kwargs)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"The model returned a {type(out).__name__}, not a tensor: wrap it so "
                "that it returns the outputs (e.g. the logits) as a tensor."
            )
        found = next((c for c in reversed(calls) if c[2] is out), None)
        if found is None:  # the output may be a view of it (squeezed, sliced)
            storage = out.untyped_storage().data_ptr()
            found = next(
                (
                    c
                    for c in reversed(calls)
                    if c[2].untyped_storage().data_ptr() == storage
                ),
                None,
            )
        if found is None and calls and _gathers(calls[-1][2], out):
            found = calls[-1]
        if found is None:
            linear = [
                n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)
            ]
            raise ValueError(
                "Could not find the last layer: no nn.Linear module produces the "
                "model's outputs. Last-layer Laplace needs a linear output layer; name "
                f"it with last_layer_name=... (the nn.Linear modules: {linear})."
            )
        self.set_last_layer(found[0])
        return out, found[1]

    def reduce_features(
        self, features: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features ``(batch, seq_len, dim)`` to ``(batch, dim)`` by
        ``feature_reduction``; 2-D features are returned as they are. With an
        ``attention_mask`` ``(batch, seq_len)``, ``pick_last`` takes the last
        position the mask keeps."""
        if features.ndim <= 2:
            return features
        if self.feature_reduction is None or features.ndim > 3:
            raise ValueError(
                f"Last-layer features have shape {tuple(features.shape)}; pass "
                "feature_reduction='pick_first', 'pick_last' or 'average' to reduce "
                "features of shape (batch, seq_len, dim) to (batch, dim)."
            )
        if self.feature_reduction is FeatureReduction.PICK_FIRST:
            return features[:, 0]
        if self.feature_reduction is FeatureReduction.PICK_LAST:
            mask = attention_mask
            if mask is not None and mask.shape == features.shape[:2]:
                rows = torch.arange(len(features), device=features.device)
                return features[rows, _last_kept(mask).to(features.device)]
            return features[:, -1]
        return features.mean(dim=1)


def _last_kept(mask: torch.Tensor) -> torch.Tensor:
    """Index ``(batch,)`` of the last nonzero position of each row of ``mask``
    ``(batch, seq_len)`` (0 for a row without one)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask != 0)).argmax(dim=1)


def _gathers(layer_out: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``out`` ``(batch, C)`` can be the per-datum selection of a layer's
    output ``(batch, seq_len, C)`` (one position per datum, as Hugging Face's
    sequence classifiers pick the last token's logits)."""
    return (
        layer_out.ndim == 3
        and out.ndim == 2
        and layer_out.shape[0] == out.shape[0]
        and layer_out.shape[-1] == out.shape[-1]
    )
