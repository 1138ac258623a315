"""The output container both frameworks return, as transformers' `ModelOutput` reads: by
attribute, by key, or by position (fields left None are skipped), and `through_layers`, how both
frameworks' stages collect the attentions it carries. Free of torch and TensorFlow."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class ModelOutput:
    """A dataclass output readable as attributes, by key, or by position (None fields skipped)."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r} is not set in this {type(self).__name__}; has {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())


def through_layers(layers: Any, x: Any, output_attentions: bool, **kwargs: Any) -> tuple[Any, tuple]:
    """`x` through each layer in turn, as a stage of either framework runs them: (x, each layer's
    attention probabilities when `output_attentions`, else an empty tuple)."""
    attentions = []
    for layer in layers:
        x = layer(x, output_attentions=output_attentions, **kwargs)
        if output_attentions:
            x, probabilities = x
            attentions.append(probabilities)
    return x, tuple(attentions)
