"""Decode speed of the local engine by thread layout: why all torch work runs on one thread.

    PYTHONPATH=. python bench/local_engine_threads.py CHECKPOINT [THREADS]

CHECKPOINT: an export (e.g. RUN/steps/export.nvfp4_max/checkpoint) or an unquantized model folder.
Each layout runs in a fresh process, three rounds alternating, 40 decode steps after a 60-token
prefill, and prints ms per token:
  A  load and decode on the main thread
  B  load on the main thread, decode on another (the server's old layout: two OpenMP pools)
  C  load and decode on one worker thread (the server's layout now)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import torch
from runner.worker.local_server import LocalModel, make_deterministic

layout, checkpoint, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
pool = ThreadPoolExecutor(1)
load = lambda: LocalModel._load(checkpoint, "bfloat16", threads)[0]
model = pool.submit(load).result() if layout == "C" else load()
ids = torch.randint(0, 1000, (1, 60))

def decode():
    torch.set_grad_enabled(False)
    past = model(ids, use_cache=True).past_key_values
    step = ids[:, -1:]
    t0 = time.perf_counter()
    for _ in range(40):
        past = model(step, past_key_values=past, use_cache=True).past_key_values
    return (time.perf_counter() - t0) / 40 * 1000

print(f"{decode() if layout == 'A' else pool.submit(decode).result():.1f}")
"""


def main() -> None:
    checkpoint, threads = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "2"
    repo = Path(__file__).resolve().parent.parent
    results: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    for _ in range(3):
        for layout in results:
            out = subprocess.run([sys.executable, "-c", CHILD, layout, str(checkpoint), threads], cwd=repo,
                                 capture_output=True, text=True, check=True)
            results[layout].append(float(out.stdout.strip().splitlines()[-1]))
    for layout, values in results.items():
        print(f"{layout}: {', '.join(f'{v:.1f}' for v in values)} ms/token")


if __name__ == "__main__":
    main()
