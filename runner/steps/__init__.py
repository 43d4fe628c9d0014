"""Step kinds: what each node of the plan does when it runs.

Each kind lives in the module named after it (runner/steps/NAME.py) and declares one StepKind
object, `KIND`: its name, the typed input the planner builds for it (runner/steps/inputs.py), the
coroutine that runs it, the modules whose code its cache key hashes, the worker it hands torch work to
(`python -m runner.worker`, through `ctx.run_worker`, which the executor runs as a local subprocess
or inside the step's container), its container role, whether it holds the GPU and its default Slurm
resources. Everything else (the scheduler's registry, the worker kinds, the keys' code) reads them
from `step_kinds()` (runner/steps/registry.py). Step ids are built by runner/steps/ids.py.

runner/steps/base.py defines the context, result and kind types; runner/steps/code.py finds the source
files whose hash is part of each kind's cache key.
"""

from __future__ import annotations

from runner.steps.base import Step, StepContext, StepKind, StepResult, input_of

__all__ = ["Step", "StepContext", "StepKind", "StepResult", "input_of"]
