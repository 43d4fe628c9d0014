"""Checks that run inside the vLLM loader venv (containers/vllm-loader-env.sh), not in the project venv.

load_check: vLLM's own model loader builds each exported checkpoint on CPU and loads its weights.
args_check: vLLM's own `vllm serve` argument parser and parser registries validate server flags.
Both import only the standard library, torch, transformers and vllm.
"""
