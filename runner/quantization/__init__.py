"""Quantization arithmetic shared by the host (recipe plan, prediction) and the worker: formats,
effective bits, footprints from safetensors headers. No torch."""


class Unknown(Exception):
    """A prediction cannot be made (a footprint, a format, a config); the message says why (never a
    guessed number)."""
