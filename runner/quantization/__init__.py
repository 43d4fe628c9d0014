"""Quantization arithmetic shared by the host (recipe plan, prediction) and the worker: formats,
effective bits, footprints from safetensors headers. No torch."""
