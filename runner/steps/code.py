"""The source files (relative to runner/) that execute each step kind.

Their hash is part of the step's cache key (plan.code_fingerprint): editing one re-runs the steps
of that kind and everything after them. Add a step kind's modules here when you add the kind.
"""

from __future__ import annotations

STEP_CODE: dict[str, tuple[str, ...]] = {
    "source": ("steps/model_source.py", "worker/convert_gguf.py"),
    "calibrate": ("steps/calibrate.py", "calibration/generate.py", "calibration/validate.py",
                  "calibration/prompts.py", "calibration/teacher_client.py", "conversations.py"),
    "quantize": ("steps/worker_steps.py", "worker/quantize.py", "worker/calib_data.py", "worker/awq_fold.py",
                 "worker/fidelity.py", "worker/nvfp4_cpu.py", "bits.py"),
    "export": ("steps/export.py", "fixups.py"),
    "verify": ("steps/worker_steps.py", "worker/verify.py", "worker/nvfp4_format.py"),
    "serve": ("steps/serve_bench.py", "serving.py", "worker/local_server.py", "benchmark/prediction.py"),
    "benchmark": ("steps/serve_bench.py", "serving.py", "worker/local_server.py", "benchmark/suites.py",
                  "benchmark/harness.py", "benchmark/speed.py"),
    "gates": ("steps/serve_bench.py", "benchmark/gates.py"),
    "report": ("steps/report_publish.py", "report.py"),
    "publish": ("steps/report_publish.py", "publish.py"),
}
