"""Build time (needs the `export` extra: torch, diffusers, transformers, onnx): checkpoint -> engine directory."""

from sdrt.export.exporter import export_model

__all__ = ["export_model"]
