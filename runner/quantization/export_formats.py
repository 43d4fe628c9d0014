"""Which ModelOpt export formats (hf_quant_config.json `quant_algo`) each serving engine loads.

Host and worker share it: verify checks an export against it, the card offers a vLLM command only
for formats vLLM loads.
"""

from __future__ import annotations

# quant_algo values vLLM's ModelOpt loader accepts (vllm/model_executor/layers/quantization/modelopt.py).
VLLM_QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8",
                    "MIXED_PRECISION")
# What the local engine (runner/worker/local_server.py: dequantize, then serve with transformers) reads.
# It decodes every layout runner/worker/weight_formats.py knows.
LOCAL_QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "MXFP8", "MXFP4", "NVFP4", "NVFP4_AWQ",
                     "NVFP4_SVD", "W4A16_NVFP4", "W4A16_AWQ", "W4A8_AWQ", "MIXED_PRECISION")
