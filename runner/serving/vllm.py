"""The `vllm` engine: a server in the recipe's serve container plugin (the `vllm` image by default),
started with `--model /model` and the recipe's flags verbatim, health-checked, labelled, and removed
after. Its output goes to the step's log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import RunnerError
from runner.quantization.verify_rules import VerifyRules
from runner.serving.engine import CardServing, Engine
from runner.serving.server import RunningServer, check_served_name, host_port, wait_healthy

if TYPE_CHECKING:
    from runner.recipe.schema import Recipe
    from runner.run_dir import RunDir
    from runner.steps.inputs import ServingInput

# quant_algo values vLLM's ModelOpt loader accepts (vllm/model_executor/layers/quantization/modelopt.py).
QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION")


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

    def where(self, recipe: Recipe) -> str:
        return f"{self.name} server in container {recipe.serve.container}"

    def card_serving(self, recipe: Recipe) -> CardServing:
        """The card repeats what this run served with: the recipe's flags and container."""
        return CardServing(args=list(recipe.serve.args), container=recipe.container_for("serve"), force_gpus=False)

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
        args = list(spec.serve.args)
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
