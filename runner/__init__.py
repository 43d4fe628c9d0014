"""recipe-runner: declarative recipes for calibration-aware NVFP4 quantization.

The host side (this package minus `runner.worker`) never imports torch.
"""

__version__ = "0.1.0"
