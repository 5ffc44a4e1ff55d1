"""Per-module ONNX exporters: one file per exported graph."""
