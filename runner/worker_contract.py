"""What the host and the worker (`python -m runner.worker SPEC.json`) exchange, and all the worker may
import from the host side besides runner/quantization: the files in the step's scratch folder.

The executor writes SPEC_FILE ({"kind", "params", "output_dir"}); the worker writes RESULT_FILE (its
summary) on success, or ERROR_FILE ({"error": one line}) on failure, its traceback going to the log.
Torch-free and importing nothing, so both sides can read it.
"""

from __future__ import annotations

SPEC_FILE = "worker_spec.json"
RESULT_FILE = "worker_result.json"
ERROR_FILE = "worker_error.json"  # the one-line reason a worker failed (its traceback is in the log)
# The scheduler's GPU lease in the spec's params ({"index": GPU among the visible, "memory_bytes": the share
# or None for the whole GPU}; runner/gpu_pool.py); the worker takes it out before its run(params) sees them.
GPU_LEASE_PARAM = "_gpu_lease"
# Where the worker keeps its lease's memory (bytes) for the code that plans batches (runner/worker/placement.py).
GPU_MEMORY_ENV = "RECIPE_GPU_MEMORY_BYTES"
