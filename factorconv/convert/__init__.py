"""Source reading, the layer-by-layer conversion pipeline and sharded writing."""

from .pipeline import convert

__all__ = ["convert"]
