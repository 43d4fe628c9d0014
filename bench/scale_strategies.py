"""How validate, plan and `run --dry-run` scale with the number of strategies (issue 15: 10,000
strategies, each command under 5 s, cost linear in the number of steps).

    python bench/scale_strategies.py [N ...]      (default: 1000 3000 10000)

Writes a recipe that extends the demo with N NVFP4 strategies into a temporary folder and times the
three commands as a user runs them (a fresh `python -m runner.cli` process each), printing seconds
and seconds per 1,000 strategies. The demo names its model's shapes (`model.shapes`), so validate and
plan predict every strategy's footprint and check it against the model's layers (issue 30 item 13:
that case regressed); the script checks, untimed, that plan did read them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def recipe_text(n: int) -> str:
    demo = REPO / "recipes" / "demo" / "smollm2-cpu.yaml"
    lines = [f"extends: {demo}", "name: scale", "quantization:", "  strategies:"]
    for i in range(n):
        lines.append(f"    - {{name: s{i:05d}, preset: NVFP4_DEFAULT_CFG, exclude: ['*layers.{i % 30}.mlp*']}}")
    return "\n".join(lines) + "\n"


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - t0
    if result.returncode not in (0,):
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n"
                         f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed


def check_shapes_read(path: Path, run_dir: Path, n: int) -> None:
    """plan --json predicted each strategy from the model's shapes (else the timings measure less)."""
    result = subprocess.run([sys.executable, "-m", "runner.cli", "plan", str(path), "--run-dir", str(run_dir),
                             "--json"], capture_output=True, text=True, cwd=REPO)
    plan = json.loads(result.stdout)
    if "model.shapes" not in plan["footprint_info"]["read_from"] or len(plan["footprint"]) != n + 2:
        raise SystemExit(f"plan did not predict every strategy from model.shapes: {plan['footprint_info']}")


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [1000, 3000, 10000]
    print(f"{'strategies':>10} {'steps':>7} {'validate s':>11} {'plan s':>8} {'dry-run s':>10}  (s per 1k strategies)")
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            path = Path(tmp) / f"scale{n}.yaml"
            path.write_text(recipe_text(n), encoding="utf-8")
            run_dir = Path(tmp) / f"run{n}"
            v = timed(["validate", str(path)])
            p = timed(["plan", str(path), "--run-dir", str(run_dir)])
            d = timed(["run", str(path), "--dry-run", "--run-dir", str(run_dir)])
            if n == counts[0]:
                check_shapes_read(path, run_dir, n)
            steps = 5 * n + 7
            print(f"{n:>10} {steps:>7} {v:>11.2f} {p:>8.2f} {d:>10.2f}  "
                  f"({v / n * 1000:.2f} / {p / n * 1000:.2f} / {d / n * 1000:.2f})")


if __name__ == "__main__":
    main()
