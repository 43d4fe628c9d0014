"""What the vllm engine starts a checkpoint with (runner/serving/vllm.py), and the draft acceptance the
benchmark records from a server's /metrics (runner/serving/server.py, runner/steps/benchmark.py).

- KV cache dtype follows the strategy, through its export: a checkpoint whose quantization config declares
  FP8 KV cache scales serves with `--kv-cache-dtype fp8`, one without does not; nothing else differs.
- MTP speculative decoding (`serve.speculative`) is on only for an export that carries `mtp.*` tensors.
- The shipped Spark serving flags: no eager mode, no redundant `--quantization`, an image pinned by digest,
  MoE families naming their MoE backend, Llama 3 with vLLM's JSON tool template.
- The benchmark's acceptance rate is its own: counters read before and after its requests from a real
  loopback server that serves /metrics with scripted values; null when a server has no such counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from pathlib import Path

import pytest

from runner.containers.plugin import load_container
from runner.executors.local import LocalExecutor
from runner.plan import build_plan
from runner.recipe.loader import load_recipe
from runner.run_dir import RunDir
from runner.scheduler import Runner, RunOptions
from runner.serving.engine import Engine, register, unregister
from runner.serving.server import RunningServer, draft_acceptance, parse_counters
from runner.serving.vllm import kv_cache_quant_algo, vllm_server_args
from runner.testing.scripted_server import ScriptedServer

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SPARK_RECIPES = sorted(p for p in RECIPES.glob("*.yaml"))


def is_moe(recipe) -> bool:
    """Whether the recipe's model routes tokens to experts, read from its shapes (config.json): never a list
    of names that a new recipe can miss."""
    from runner.quantization.decode import active_expert_fraction

    return recipe.model.shapes is not None and active_expert_fraction(recipe.model.shapes / "config.json") is not None


def serving_of(recipe: str, strategy: str | None = None):
    """The ServingInput the plan hands the serve step of one strategy of a shipped recipe."""
    plan = build_plan(load_recipe(RECIPES / f"{recipe}.yaml").recipe)
    serve = [s for sid, s in plan.steps.items() if sid.startswith("serve.") and (strategy is None or s.strategy == strategy)]
    return serve[0].inputs.serving


def export(folder: Path, kv: object = None, tensors: tuple[str, ...] = ("model.layers.0.mlp.down_proj.weight",),
           where: str = "hf_quant_config") -> Path:
    """A ModelOpt-style NVFP4 export: its quantization config (with `kv` as kv_cache_quant_algo) and a
    safetensors file holding the named BF16 tensors (2 x 2 zeros each)."""
    folder.mkdir(parents=True, exist_ok=True)
    quant = {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": kv, "exclude_modules": ["lm_head"]}
    if where == "hf_quant_config":
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
        (folder / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": quant}))
    else:  # ModelOpt >= 0.31 also writes it into config.json, which vLLM reads first
        (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "modelopt", **quant}}))
    header = {name: {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8 * i, 8 * i + 8]}
              for i, name in enumerate(tensors)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8 * len(tensors)))
    return folder


# --- KV cache dtype ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["hf_quant_config", "config"])
def test_a_kv_fp8_strategy_serves_fp8_kv_and_one_without_does_not(tmp_path, where):
    """The same recipe's serving input, two strategies' exports (ModelOpt writes kv_cache_quant_algo FP8 when the
    strategy calibrated KV scales, e.g. a `*-kv_fp8_cast` recipe, and null otherwise): the command lines
    differ exactly by `--kv-cache-dtype fp8`."""
    serving = serving_of("qwen35-35b-a3b")
    with_kv = vllm_server_args(serving, export(tmp_path / "kv_fp8", kv="FP8", where=where))
    without = vllm_server_args(serving, export(tmp_path / "plain", kv=None, where=where))
    assert with_kv.args == [*without.args, "--kv-cache-dtype", "fp8"]
    assert without.args == list(serving.serve.args)
    assert any("kv_cache_quant_algo is FP8" in note for note in with_kv.notes)


def test_kv_cache_quant_algo_is_read_as_vllm_reads_it(tmp_path):
    assert kv_cache_quant_algo(export(tmp_path / "a", kv="fp8")) == "FP8"  # ModelOpt may write it lowercase
    assert kv_cache_quant_algo(export(tmp_path / "b", kv=None)) is None
    scheme = tmp_path / "c"
    scheme.mkdir()
    (scheme / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4",
        "kv_cache_scheme": {"type": "float", "num_bits": 8, "dynamic": False}}}))
    assert kv_cache_quant_algo(scheme) == "FP8"
    assert kv_cache_quant_algo(tmp_path / "missing") is None


def test_a_kv_cache_dtype_the_recipe_writes_wins(tmp_path, write):
    serving = serving_of("llama31-8b-instruct")
    serving = serving.model_copy(update={"serve": serving.serve.model_copy(
        update={"args": [*serving.serve.args, "--kv-cache-dtype=auto"]})})
    args = vllm_server_args(serving, export(tmp_path / "e", kv="FP8"))
    assert args.args == list(serving.serve.args) and "serve.args sets it" in args.notes[0]


# --- MTP speculative decoding -----------------------------------------------------------------


def test_mtp_speculation_only_for_an_export_with_the_mtp_head(tmp_path):
    serving = serving_of("qwen35-35b-a3b")
    assert serving.serve.speculative is not None
    heads = export(tmp_path / "mtp", kv="FP8", tensors=("model.layers.0.mlp.down_proj.weight", "mtp.fc.weight"))
    plain = export(tmp_path / "plain", kv="FP8")
    on, off = vllm_server_args(serving, heads), vllm_server_args(serving, plain)
    assert on.args[:len(off.args)] == off.args
    flag, config = on.args[len(off.args):]
    assert flag == "--speculative-config"
    assert json.loads(config) == {"method": "mtp", "num_speculative_tokens": 3, "moe_backend": "triton"}
    assert "--speculative-config" not in off.args
    assert any("no mtp.* tensors" in note for note in off.notes)


def test_qwen3_next_speculates_as_vllms_recipe_with_its_extra_flag(tmp_path):
    serving = serving_of("qwen3-next-80b-a3b")
    args = vllm_server_args(serving, export(tmp_path / "e", tensors=("mtp.layers.0.mlp.gate.weight",))).args
    i = args.index("--speculative-config")
    assert json.loads(args[i + 1]) == {"method": "mtp", "num_speculative_tokens": 2}
    assert args[i + 2:] == ["--no-enable-chunked-prefill"]
    assert "--no-enable-chunked-prefill" not in vllm_server_args(serving, export(tmp_path / "f")).args


def test_dense_and_non_mtp_families_never_speculate(tmp_path):
    for recipe in ("llama31-8b-instruct", "qwen3-30b-a3b", "nemotron3-nano-30b-a3b", "gemma3-12b-it"):
        serving = serving_of(recipe)
        assert serving.serve.speculative is None, recipe
        assert "--speculative-config" not in vllm_server_args(serving, export(tmp_path / recipe, tensors=("mtp.x",))).args


# --- the shipped Spark flags ------------------------------------------------------------------


@pytest.mark.parametrize("path", SPARK_RECIPES, ids=lambda p: p.stem)
def test_spark_recipes_serve_with_cuda_graphs_and_detected_quantization(path):
    recipe = load_recipe(path).recipe
    if recipe.serve.engine != "vllm":
        pytest.skip("not served by vLLM")
    args = recipe.serve.args
    assert "--enforce-eager" not in args
    assert not any(a == "--quantization" or a.startswith("--quantization=") for a in args)
    assert "--kv-cache-dtype" not in args  # derived from each export, never by hand
    assert ("--moe-backend" in args) == is_moe(recipe), path.stem
    if is_moe(recipe):
        assert args[args.index("--moe-backend") + 1] == "marlin", path.stem


def test_the_vllm_image_is_pinned_by_digest():
    image = load_container("vllm").image
    assert image is not None and "@sha256:" in image and len(image.split("@sha256:")[1]) == 64
    text = (ROOT / "containers" / "vllm.yaml").read_text()
    assert "Pinned 20" in text and "Source of the pin" in text


def test_llama3_serves_json_tool_calls_with_vllms_template():
    args = load_recipe(RECIPES / "llama31-8b-instruct.yaml").recipe.serve.args
    assert args[args.index("--tool-call-parser") + 1] == "llama3_json"
    assert args[args.index("--chat-template") + 1] == "/vllm-workspace/examples/tool_chat_template_llama3.1_json.jinja"


# --- draft acceptance from /metrics -----------------------------------------------------------

ACCEPTED, DRAFT_TOKENS, DRAFTS = ("vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total",
                                  "vllm:spec_decode_num_drafts_total")


def test_counters_are_summed_over_label_sets_and_the_rate_is_the_difference():
    text = (f'# TYPE {ACCEPTED} counter\n{ACCEPTED}{{engine="0",model_name="m"}} 5.0\n'
            f'{ACCEPTED}{{engine="1",model_name="m"}} 7.0\n{DRAFT_TOKENS}{{engine="0"}} 30\n'
            f'vllm:spec_decode_num_accepted_tokens_created{{engine="0"}} 1.7e9\n{DRAFTS} 10\n')
    names = {"accepted_tokens": ACCEPTED, "draft_tokens": DRAFT_TOKENS, "drafts": DRAFTS}
    assert parse_counters(text, names) == {"accepted_tokens": 12.0, "draft_tokens": 30.0, "drafts": 10.0}
    before = {"accepted_tokens": 12.0, "draft_tokens": 30.0, "drafts": 10.0}
    after = {"accepted_tokens": 32.0, "draft_tokens": 60.0, "drafts": 20.0}
    assert draft_acceptance(before, after) == {"acceptance_rate": 0.6667, "mean_acceptance_length": 3.0,
                                               "drafts": 10, "draft_tokens": 30, "accepted_tokens": 20}
    assert draft_acceptance(before, before) is None  # no drafts proposed: not measured, not 0
    assert draft_acceptance(None, after) is None and draft_acceptance(before, None) is None


class SpeculatingEngine(Engine):
    """Scripted servers: the candidates speculate (each request proposes 3 draft tokens in one draft and 2 are
    accepted, on top of counters that already stand at 100/300/30 when the server starts, as after the
    serve step's probe or a warm-up); the baseline exposes no /metrics."""

    name = "speculating"
    quant_algos = ("NVFP4",)
    kernels = "a scripted server with /metrics (tests/test_serving_flags.py)"

    @contextlib.asynccontextmanager
    async def serve(self, spec, model_dir, run_dir, step_id, name, pin_port=True):
        speculates = name != "baseline"
        server = await ScriptedServer(
            model=name, metrics={DRAFTS: 100.0, DRAFT_TOKENS: 300.0, ACCEPTED: 30.0} if speculates else None,
            metrics_per_request={DRAFTS: 1.0, DRAFT_TOKENS: 3.0, ACCEPTED: 2.0}).start()
        try:
            yield RunningServer(server.url, name, self.name)
        finally:
            await server.stop()


def test_the_benchmark_records_its_own_draft_acceptance_rate(write, tmp_path):
    from test_engines import demo_served_by, stand_ins

    engine = SpeculatingEngine()
    register(engine)
    try:
        plan = build_plan(load_recipe(demo_served_by(write, engine.name)).recipe)
        run_dir = RunDir(tmp_path / "run")
        outcome = asyncio.run(Runner(plan, run_dir, LocalExecutor(), kinds=stand_ins([])).run(
            RunOptions(until=["benchmark.nvfp4_max", "benchmark.baseline"])))
    finally:
        unregister(engine.name)
    assert outcome.states["benchmark.nvfp4_max"] == "complete", outcome.messages
    results = json.loads((run_dir.step_dir("benchmark.nvfp4_max") / "results.json").read_text())
    spec = results["speculative_decoding"]
    # Only the benchmark's own requests count: 2 of 3 draft tokens accepted each; the counters' standing
    # values at start (30 of 300, a rate of 0.1) are not this benchmark's.
    assert results["draft_acceptance_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert spec["drafts"] > 0 and spec["draft_tokens"] == 3 * spec["drafts"] and spec["mean_acceptance_length"] == 3.0
    baseline = json.loads((run_dir.step_dir("benchmark.baseline") / "results.json").read_text())
    assert baseline["draft_acceptance_rate"] is None and baseline["speculative_decoding"] is None
    assert run_dir.record("benchmark.nvfp4_max")["summary"]["draft_acceptance_rate"] == results["draft_acceptance_rate"]
