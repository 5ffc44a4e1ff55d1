"""omni-export: an ONNX export compiler for Qwen2.5-Omni."""

__version__ = "0.1.0"
