"""Entry point: python -m runner.worker SPEC.json"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from runner.worker_contract import ERROR_FILE, GPU_LEASE_PARAM, GPU_MEMORY_ENV, RESULT_FILE


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m runner.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    kind = spec["kind"]
    if not is_worker(kind):
        print(f"unknown worker kind {kind!r}: no module runner/worker/{kind}.py", file=sys.stderr)
        return 2
    output_dir = Path(spec["output_dir"])
    # Libraries that write to relative paths (ModelOpt's GPTQ `checkpoint_dir: output/...`) write
    # here, inside the step's scratch folder, and it is removed before the step commits.
    work_dir = output_dir / ".work"
    work_dir.mkdir(exist_ok=True)
    os.chdir(work_dir)
    t0 = time.monotonic()
    print(f"[worker] {kind} starting", flush=True)
    lease = spec["params"].pop(GPU_LEASE_PARAM, None)
    apply_gpu_lease(lease)
    try:
        module = importlib.import_module(f"runner.worker.{kind}")  # its import errors are the step's error
        result = module.run(spec["params"], output_dir)
    except BaseException as exc:  # noqa: BLE001 - the message goes to the runner, the traceback to the log
        traceback.print_exc()
        message = explain(exc)
        (output_dir / ERROR_FILE).write_text(json.dumps({"error": message}), encoding="utf-8")
        print(f"[worker] {kind} failed: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        os.chdir(output_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
    result.setdefault("summary", {})["worker_seconds"] = round(time.monotonic() - t0, 3)
    if lease:
        result["summary"]["gpu_lease"] = lease
    result.setdefault("versions", {}).update(_versions())
    tmp = output_dir / f"{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    tmp.replace(output_dir / RESULT_FILE)
    print(f"[worker] {kind} done in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


def apply_gpu_lease(lease: dict | None) -> None:
    """The scheduler's GPU lease (runner/gpu_pool.py): which of the visible GPUs this worker runs on and,
    where GPU steps share it, how much of its memory it may use. Set before torch is imported, so CUDA
    sees only that GPU; the memory cap becomes the allocator's limit (an overrun is this worker's
    out-of-memory error, not its neighbour's) and the free memory the worker plans its batches with."""
    if not lease:
        return
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    index = int(lease["index"])
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    if lease.get("memory_bytes"):
        os.environ[GPU_MEMORY_ENV] = str(int(lease["memory_bytes"]))
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, int(lease["memory_bytes"]) / total), 0)
    print(f"[worker] GPU lease: device {os.environ['CUDA_VISIBLE_DEVICES']}"
          + (f", {int(lease['memory_bytes']) / 1e9:.1f} GB of it" if lease.get("memory_bytes") else ""), flush=True)


def is_worker(kind: str) -> bool:
    """Whether runner/worker/KIND.py exists. The step kinds name their workers (StepKind.worker, each
    checked to have run(params, output_dir) by tests/test_step_kinds.py): the worker imports no host
    module to list them."""
    return kind.isidentifier() and importlib.util.find_spec(f"runner.worker.{kind}") is not None


# Messages of libraries that mean "this needs a CUDA GPU" (ModelOpt's Triton kernels, CUDA-only
# calibration paths, torch without CUDA).
NEEDS_GPU = ("requires triton", "install with pip install triton", "torch not compiled with cuda",
             "no cuda gpus are available", "found no nvidia driver", "cuda is not available", "requires cuda",
             "needs a gpu", "only supported on cuda", "cuda device")


def explain(exc: BaseException) -> str:
    """One line for the user: what failed, in words that say what to do when the cause is known."""
    if isinstance(exc, SystemExit) and isinstance(exc.code, str):
        return exc.code
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].rstrip(".")
    name = type(exc).__name__
    if any(marker in text.lower() for marker in NEEDS_GPU):
        import torch

        where = "this machine has no CUDA GPU" if not torch.cuda.is_available() else "the GPU path failed"
        return (f"needs a CUDA GPU ({where}): {name}: {first}. Run this strategy on a GPU machine, or pick "
                "one whose calibration runs on CPU (e.g. preset NVFP4_DEFAULT_CFG with algorithm max)")
    return f"{name}: {first}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "nvidia-modelopt", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv))
