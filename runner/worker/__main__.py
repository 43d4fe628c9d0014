"""Entry point: python -m runner.worker SPEC.json"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

from runner.executors.base import RESULT_FILE

WORKER_KINDS = ("convert_gguf", "quantize", "verify")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m runner.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    kind = spec["kind"]
    if kind not in WORKER_KINDS:
        print(f"unknown worker kind {kind!r}; known: {', '.join(WORKER_KINDS)}", file=sys.stderr)
        return 2
    output_dir = Path(spec["output_dir"])
    module = importlib.import_module(f"runner.worker.{kind}")
    t0 = time.monotonic()
    print(f"[worker] {kind} starting", flush=True)
    result = module.run(spec["params"], output_dir)
    result.setdefault("summary", {})["worker_seconds"] = round(time.monotonic() - t0, 3)
    result.setdefault("versions", {}).update(_versions())
    tmp = output_dir / f"{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    tmp.replace(output_dir / RESULT_FILE)
    print(f"[worker] {kind} done in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "nvidia-modelopt", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv))
