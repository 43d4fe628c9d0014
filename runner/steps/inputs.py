"""What each step kind reads: one frozen, typed input model per kind, built by the planner.

A step receives only its input object (`ctx.inputs`), never the whole recipe, and its cache key is
the hash of that same object (plus its dependencies' keys, the files it reads and its code; see
plan.step_key). So what a step can read and what invalidates it are one list: a field a step does
not read cannot re-run it, and a field it reads always does.

The report and publish steps print the resolved recipe itself (the card embeds it, the upload
carries recipe.yaml), so they take the whole recipe: any recipe change re-renders the documents,
and nothing upstream of them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runner.recipe.schema import (
    Baseline,
    CalibrationSpec,
    Fixup,
    Gate,
    ModelSource,
    Recipe,
    SelectionSpec,
    ServeSpec,
    SpeedSpec,
    Strategy,
    SuiteRef,
    VllmLoaderCheck,
)
from runner.vllm_env.environment import VllmEnvironment


class StepInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def key_payload(self) -> dict[str, Any]:
        """What the cache key hashes: the input as JSON (paths as strings)."""
        return self.model_dump(mode="json")


class SourceInput(StepInput):
    source: ModelSource
    architecture: str | None
    dtype: str  # a GGUF conversion writes this dtype


class CalibrateInput(StepInput):
    calibration: CalibrationSpec


class QuantizeInput(StepInput):
    strategy: Strategy
    exclude: list[str]  # the recipe's exclusions for this strategy, resolved (QuantizationSpec.exclusions)
    calib_samples: int
    max_length: int
    seed: int
    dtype: str
    architecture: str | None
    # Fidelity is measured on `held_out` conversations of the recipe's set that follow the first
    # `held_out_after` (calibration.samples) of its seeded shuffle: never calibrated on, the same for
    # every strategy whatever set it calibrates on.
    held_out: int = 32
    held_out_after: int = 512
    # Per-decoder-layer KL contribution on up to this many held-out conversations (0: not measured);
    # the layout search asks for it on candidates it may back off (Strategy.sensitivity).
    sensitivity: int = Field(0, ge=0)
    # An auto_quantize strategy's score step (its search state is restored, not recomputed); None otherwise.
    score_step: str | None = None


class ScoreInput(StepInput):
    """auto_quantize's search state: each format's calibration and each layer group's sensitivity score,
    made once and shared by every auto_quantize strategy with these settings (another effective_bits
    target re-solves from it). What decides the scores is exactly this: the model (the source dep), the
    calibration (the calibrate dep, samples, length, seed), the formats, the method, the sample counts and
    the layers auto_quantize may not touch."""

    formats: list[str]
    method: str
    num_calib_steps: int
    num_score_steps: int
    exclude: list[str]
    calibration: str | None  # the alternative calibration set the strategies name, None for the recipe's
    calib_samples: int
    max_length: int
    seed: int
    dtype: str
    architecture: str | None


class ExportInput(StepInput):
    fixups: list[Fixup]


class VerifyInput(StepInput):
    exclude: list[str]
    engine: str  # what the serving engine must be able to load
    vllm_loader: VllmLoaderCheck
    # The vLLM environment found when the plan was made (runner/vllm_env), or why there is none. In the
    # key: building the environment, or another vLLM version, verifies again.
    vllm: VllmEnvironment | None = None
    vllm_not_run: str = ""
    language_model_only: bool = False  # serve.args has --language-model-only: vLLM builds no vision tower
    # What the export fix-ups say about the source's tensors (renamed, carried, dropped on purpose): verify
    # accounts for every tensor of the source checkpoint with it.
    fixups: list[Fixup] = Field(default_factory=list)


class ServingInput(StepInput):
    """How a checkpoint is served: shared by serve and benchmark."""

    serve: ServeSpec
    container: str  # the serve container plugin, as Recipe.container_for resolves it
    dtype: str  # the local engine's compute dtype
    env_names: list[str] = Field(default_factory=list)  # host variables passed into the server container


class ServeInput(StepInput):
    serving: ServingInput
    hardware: str  # for the decode-speed prediction


class BenchmarkInput(StepInput):
    serving: ServingInput
    system_prompt: str
    suites: list[SuiteRef]
    speed: SpeedSpec
    concurrency: int
    baseline: Baseline | None = None  # set for benchmark.baseline only
    # A candidate's gate-level speed runs interleaved with the source model served alongside it
    paired_baseline: bool = False
    # benchmark.sequential: the gates a candidate's suites are judged by between looks (empty: ask every item)
    sequential_gates: list[Gate] = Field(default_factory=list)


class GatesInput(StepInput):
    gates: list[Gate]
    selection: SelectionSpec
    baseline_name: str | None
    # Set by the scheduler when some branches failed: {strategy: the step that failed}.
    failed_branches: dict[str, str] = Field(default_factory=dict)
    # With --strategy: the recipe's other strategies that have no current benchmark in the run directory
    # (plan.with_rivals); the ones that have one are deps, and compete.
    not_benchmarked: list[str] = Field(default_factory=list)
    # Strategies built to damage behaviour (Strategy.negative_control): judged, never selected.
    negative_controls: list[str] = Field(default_factory=list)


NOT_BENCHMARKED = "not benchmarked in this run"  # why GatesInput.not_benchmarked strategies are not judged


class ReportInput(StepInput):
    recipe: Recipe
    failed_branches: dict[str, str] = Field(default_factory=dict)  # as GatesInput's: set by the scheduler
    search: dict[str, Any] | None = None  # the search's record (search.driver.SearchResult.to_json), for the card


class PublishInput(StepInput):
    recipe: Recipe
    failed_branches: dict[str, str] = Field(default_factory=dict)
