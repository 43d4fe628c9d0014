"""The `vllm` engine: a server in the recipe's serve container plugin (the `vllm` image by default),
started with `--model /model`, the recipe's flags and the flags derived from the checkpoint
(`server_args`), health-checked, labelled, and removed after. Its output goes to the step's log.

Derived from the export, in this one place rather than by hand in each recipe:

- `--kv-cache-dtype fp8` when the export's quantization config declares FP8 KV cache scales
  (`kv_cache_quant_algo: FP8` in hf_quant_config.json / config.json's quantization_config, or a
  compressed-tensors style `kv_cache_scheme` of 8-bit floats), i.e. the strategy calibrated them
  (ModelOpt's `*-kv_fp8*` recipes, presets with KV cache quantization). How vLLM 0.33.0 treats it
  (vllm/model_executor/layers/quantization/modelopt.py `ModelOptQuantConfigBase.from_config`,
  vllm/utils/torch_utils.py `resolve_kv_cache_dtype_string`): the loader reads `kv_cache_quant_algo`
  into the quant config, which then loads the exported k/v scales; with `--kv-cache-dtype auto` (the
  default) 0.33.0 resolves the cache dtype from that key itself (FP8 -> fp8_e4m3). The flag is still
  passed: it is what NVIDIA's and vLLM's recipes for ModelOpt NVFP4 checkpoints write, it makes the
  served dtype visible in the command line and the card, and it does not depend on a vLLM version
  doing the resolution. An export without calibrated KV scales gets no flag (vLLM would otherwise run
  FP8 KV with unit scales).
- `--speculative-config` from `serve.speculative` only when the export carries `mtp.*` tensors: vLLM's
  MTP method builds its draft from the checkpoint's own MTP head and fails to start without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import RunnerError
from runner.quantization.safetensors_headers import has_safetensors, read_headers
from runner.quantization.verify_rules import VerifyRules
from runner.serving.engine import CardServing, Engine, ServerArgs
from runner.serving.server import RunningServer, check_served_name, host_port, wait_healthy

if TYPE_CHECKING:
    from runner.recipe.schema import Recipe
    from runner.run_dir import RunDir
    from runner.steps.inputs import ServingInput

# quant_algo values vLLM's ModelOpt loader accepts (vllm/model_executor/layers/quantization/modelopt.py).
QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION")


# The export's KV cache quantization (kv_cache_quant_algo) -> vLLM's --kv-cache-dtype. Others (none today from
# ModelOpt's PTQ recipes) are left to vLLM's `auto`, which reads the checkpoint.
KV_CACHE_DTYPES = {"FP8": "fp8"}
KV_FLAG = "--kv-cache-dtype"
SPEC_FLAG = "--speculative-config"
MTP_PREFIX = "mtp."  # the MTP head's tensors in Qwen3.5/3.6 and Qwen3-Next checkpoints (vLLM's loaders read these)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def kv_cache_quant_algo(model_dir: Path) -> str | None:
    """The KV cache quantization a checkpoint declares, read as vLLM reads it: config.json's
    quantization_config (ModelOpt >= 0.31), else hf_quant_config.json; ModelOpt's nested
    `quantization.kv_cache_quant_algo` or flat key, or a compressed-tensors style `kv_cache_scheme`."""
    config = _read_json(model_dir / "config.json").get("quantization_config") \
        or _read_json(model_dir / "hf_quant_config.json")
    if not isinstance(config, dict):
        return None
    inner = config.get("quantization") if isinstance(config.get("quantization"), dict) else config
    algo = (inner.get("kv_cache_scheme") or config.get("kv_cache_scheme")
            or inner.get("kv_cache_quant_algo") or config.get("kv_cache_quant_algo"))
    if isinstance(algo, dict):
        if algo.get("type") == "float" and algo.get("num_bits") == 8:
            return "FP8"
        if algo.get("type") == "float" and algo.get("num_bits") == 4:
            return "NVFP4"
        return None
    return str(algo).upper() if isinstance(algo, str) and algo else None


def has_mtp_head(model_dir: Path) -> bool:
    """Whether the checkpoint's safetensors hold MTP tensors (`mtp.*`)."""
    if not has_safetensors(model_dir):
        return False
    return any(name.startswith(MTP_PREFIX) for name in read_headers(model_dir))


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def vllm_server_args(spec: ServingInput, model_dir: Path) -> ServerArgs:
    """serve.args, then --kv-cache-dtype from the export's KV cache quantization, then MTP speculative decoding
    when serve.speculative asks for it and the export has the head. A flag the recipe writes itself wins."""
    args, notes = list(spec.serve.args), []
    kv = kv_cache_quant_algo(model_dir)
    if _has_flag(args, KV_FLAG):
        notes.append(f"{KV_FLAG} as serve.args sets it (the checkpoint declares "
                     f"{'KV cache quantization ' + kv if kv else 'no KV cache quantization'})")
    elif kv in KV_CACHE_DTYPES:
        args += [KV_FLAG, KV_CACHE_DTYPES[kv]]
        notes.append(f"{KV_FLAG} {KV_CACHE_DTYPES[kv]}: the checkpoint's kv_cache_quant_algo is {kv}")
    elif kv:
        notes.append(f"KV cache dtype left to vLLM (auto), which reads the checkpoint's kv_cache_quant_algo {kv}")
    speculative = spec.serve.speculative
    if speculative is not None and not _has_flag(args, SPEC_FLAG):
        if has_mtp_head(model_dir):
            config = {"method": speculative.method, "num_speculative_tokens": speculative.num_speculative_tokens,
                      **speculative.config}
            args += [SPEC_FLAG, json.dumps(config, separators=(",", ":")), *speculative.args]
            notes.append(f"speculative decoding on: {speculative.method}, {speculative.num_speculative_tokens} "
                         f"tokens (the checkpoint carries {MTP_PREFIX}* tensors)")
        else:
            notes.append(f"speculative decoding off: serve.speculative asks for {speculative.method}, but the "
                         f"checkpoint has no {MTP_PREFIX}* tensors (its MTP head was not exported)")
    return ServerArgs(args, notes)


class VllmEngine(Engine):
    name = "vllm"
    quant_algos = QUANT_ALGOS
    kernels = "vLLM ModelOpt kernels (native NVFP4 on Blackwell; W4A16 through Marlin on older GPUs)"
    runs_vllm = True

    @property
    def verify_rules(self) -> VerifyRules:
        # vLLM quantizes activations, has no place for pre_quant_scale, and fuses projections.
        return VerifyRules(engine=self.name, quant_algos=self.quant_algos, layer_algos=True, input_scales=True,
                           no_pre_quant_scale=True, vllm_module_rules=True)

    def server_args(self, spec: ServingInput, model_dir: Path) -> ServerArgs:
        return vllm_server_args(spec, model_dir)

    def where(self, recipe: Recipe) -> str:
        return f"{self.name} server in container {recipe.serve.container}"

    def card_serving(self, recipe: Recipe, served_args: list[str]) -> CardServing:
        """The card repeats what this run served with: the exact flags the serve step started vLLM with (the
        recipe's and those derived from the export, e.g. --kv-cache-dtype, --speculative-config) and its container."""
        return CardServing(args=list(served_args), container=recipe.container_for("serve"), force_gpus=False)

    def export_refusal(self, what: str, algos: set[str], weight_only_fp8: list[str]) -> str | None:
        """Why vLLM's ModelOpt loader would refuse what `what` exports (quant_algos `algos`), or None."""
        refused = sorted(a for a in algos if a not in QUANT_ALGOS)
        if weight_only_fp8 and not refused:
            return (f"{what} leaves {len(weight_only_fp8)} FP8 layer(s) without an activation scale "
                    f"(weight-only FP8, e.g. {weight_only_fp8[0]}), which vLLM's ModelOpt FP8 path cannot "
                    "load: choose another recipe, or serve.engine: local")
        if refused:
            return (f"{what} exports {', '.join(refused)}, which vLLM's ModelOpt loader does not load (it "
                    f"loads {', '.join(QUANT_ALGOS)}): choose another recipe, or serve.engine: local")
        return None

    @contextlib.asynccontextmanager
    async def serve(self, spec: ServingInput, model_dir: Path, run_dir: RunDir, step_id: str, name: str,
                    pin_port: bool = True) -> AsyncIterator[RunningServer]:
        from runner.containers import docker_api
        from runner.containers.launcher import launched
        from runner.containers.plugin import load_container

        log_path = run_dir.log_path(step_id)
        plugin = load_container(spec.container)
        if plugin.runtime != "docker":
            raise RunnerError(f"serve.container {plugin.name!r} is not a docker plugin; the vllm engine serves in a "
                              "container (use serve.engine: local to serve without one)")
        api = await asyncio.to_thread(docker_api.client)
        port = host_port(spec.serve.port if pin_port else None)
        args = self.server_args(spec, model_dir).args
        if "--served-model-name" not in args:
            args += ["--served-model-name", name]
        async with launched(api, plugin, "server", ["--model", "/model", *args], run_dir=run_dir.root, step=name,
                            binds={model_dir: "/model"}, env_names=spec.env_names, env=spec.serve.env,
                            ports={f"{plugin.port}/tcp": ("127.0.0.1", port)}) as container:
            health = plugin.health.path if plugin.health else "/health"
            timeout = min(spec.serve.startup_timeout_s, plugin.health.timeout_s if plugin.health else 900)
            try:
                await wait_healthy(f"http://127.0.0.1:{port}", timeout, None, log_path, health, container,
                                   plugin.health.interval_s if plugin.health else 0.5)
            finally:
                logs = await asyncio.to_thread(container.logs)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("a", encoding="utf-8") as log:
                    log.write(logs.decode("utf-8", errors="replace"))
            await check_served_name(f"http://127.0.0.1:{port}/v1", name)
            yield RunningServer(f"http://127.0.0.1:{port}/v1", name, engine=self.name)
