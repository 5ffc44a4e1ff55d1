"""Quantization: int4/int8 block formats, RTN, AWQ, AutoAWQ checkpoints."""
