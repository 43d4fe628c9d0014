"""The serving-engine interface and the registry of engines (`serve.engine` names one).

An engine starts a checkpoint's OpenAI-compatible server (`serve`, an async context manager that
yields a RunningServer and stops the server on every way out) and says, as data, what the rest of
the runner needs to know of it: the export formats it loads and the verify rules that follow
(runner/quantization/verify_rules.py), where it runs (`recipe plan`), what its speed numbers measure
(the benchmark's `measured_on`), whether candidates' speed is paired with the baseline by default,
and how the card tells a reader to serve the published model. Steps call the engine object; none
branches on its name.

The built-in engines (vllm.py, local.py) are registered by runner/serving/__init__.py; `register`
adds another.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from runner.quantization.verify_rules import VerifyRules

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from runner.run_dir import RunDir
    from runner.serving.server import RunningServer

# The recipe (runner.recipe.schema.Recipe) and the serving input (runner.steps.inputs.ServingInput) are
# typed Any here: both modules read this registry (serve.engine's validator, vLLM's verdict), so this
# module imports neither.
Recipe = Any
ServingInput = Any

# Not an engine: a baseline the user runs (benchmark.baseline.kind: endpoint); the benchmark records it so.
ENDPOINT = "endpoint"
ENDPOINT_KERNELS = "the user's own server (its hardware is not recorded here)"


@dataclass(frozen=True)
class ServerArgs:
    """The flags a server is started with for one checkpoint: the recipe's serve.args and what the engine derives
    from the checkpoint itself (e.g. vLLM's KV cache dtype), and a line for each derived choice."""

    args: list[str]
    notes: list[str]


@dataclass(frozen=True)
class CardServing:
    """How the card's docker line serves the published model (always with vLLM: what a reader runs)."""

    args: list[str]  # vLLM flags after --model
    container: str  # the container plugin whose image, port and shm size the line uses
    force_gpus: bool  # ask for GPUs even where the plugin says none


class Engine(ABC):
    name: ClassVar[str]
    quant_algos: ClassVar[tuple[str, ...]]  # hf_quant_config.json quant_algo values it loads
    kernels: ClassVar[str]  # what its speed numbers measure (the benchmark's measured_on.kernel_path)
    # Speed paired with the served baseline when SpeedSpec.paired_baseline is `auto`: for an engine
    # whose speed drifts with the machine's other load (a CPU), alternating is the fair comparison.
    pairs_speed_by_default: ClassVar[bool] = False
    # Its server is vLLM itself: a refusal by vLLM's own loader (verify) fails the export rather than
    # warning, and `recipe validate` checks serve.args with vLLM's parser.
    runs_vllm: ClassVar[bool] = False
    # It reads tool calls with runner/benchmark/tool_calls.py: the recipe's --tool-call-parser must be
    # one implemented there (recipe.schema.ServeSpec refuses another).
    parses_tool_calls_here: ClassVar[bool] = False

    @property
    def verify_rules(self) -> VerifyRules:
        """What verify checks of an export for this engine; by default only that it loads the quant_algo."""
        return VerifyRules(engine=self.name, quant_algos=self.quant_algos)

    @abstractmethod
    def serve(self, spec: ServingInput, model_dir: Path, run_dir: RunDir, step_id: str, name: str,
              pin_port: bool = True) -> contextlib.AbstractAsyncContextManager[RunningServer]:
        """Start `model_dir` served as `name`, yield it once it answers, stop it on the way out; its output
        goes to the step's log. `pin_port`: listen on serve.port when the recipe sets one (False for a
        second server started alongside, e.g. the paired baseline)."""

    def server_args(self, spec: ServingInput, model_dir: Path) -> ServerArgs:
        """The flags `serve` starts `model_dir` with; by default the recipe's serve.args as written. The serve and
        benchmark steps record them, so the card can repeat exactly what was served."""
        return ServerArgs(list(spec.serve.args), [])

    def where(self, recipe: Recipe) -> str:
        """Where its server runs, as `recipe plan` says it."""
        return f"{self.name} server"

    def export_refusal(self, what: str, algos: set[str], weight_only_fp8: list[str]) -> str | None:
        """Why this engine could not load what a strategy (`what`) would export, known before quantizing
        (runner/quantization/preflight.py): the export's quant_algos, and its FP8 layers without an
        activation scale. None: no objection (verify still checks the export itself)."""
        return None

    def card_serving(self, recipe: Recipe, served_args: list[str]) -> CardServing:
        """The card's vLLM line: vLLM's default container with GPUs; `served_args` (what this run's serve step
        started its server with) are another engine's flags, so none are repeated."""
        return CardServing(args=[], container="vllm", force_gpus=True)


_ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> None:
    """Make `engine` servable as `serve.engine: <engine.name>`."""
    _ENGINES[engine.name] = engine


def unregister(name: str) -> None:
    _ENGINES.pop(name, None)


def known_engines() -> list[str]:
    return sorted(_ENGINES)


def engine_for(name: str) -> Engine:
    engine = _ENGINES.get(name)
    if engine is None:
        raise KeyError(unknown_engine(name))
    return engine


def unknown_engine(name: str) -> str:
    """The error for serve.engine naming no registered engine: the known ones, and the likely one."""
    from runner.errors import closest

    guess = closest(name, known_engines())
    return (f"unknown serving engine {name!r}; the known engines are {', '.join(known_engines())}: "
            + (f"did you mean {guess!r}?" if guess else "set serve.engine to one of them"))


@contextlib.asynccontextmanager
async def serving(spec: ServingInput, model_dir: Path, run_dir: RunDir, step_id: str, name: str,
                  pin_port: bool = True) -> AsyncIterator[RunningServer]:
    """The recipe's engine serving `model_dir` (Engine.serve)."""
    async with engine_for(spec.serve.engine).serve(spec, model_dir, run_dir, step_id, name, pin_port) as server:
        yield server


def kernel_path(engine: str) -> str:
    """What the benchmark's speed numbers measure, for the engine named (or the user's endpoint)."""
    if engine == ENDPOINT:
        return ENDPOINT_KERNELS
    known = _ENGINES.get(engine)
    return known.kernels if known is not None else engine
