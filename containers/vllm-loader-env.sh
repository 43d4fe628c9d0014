#!/usr/bin/env bash
# Build a venv at PATH (the project uses .venv-vllm) in which vLLM's own code can load exported checkpoints
# on a CPU-only machine (runner/vllm_env/load_check.py) and parse `vllm serve` flags
# (runner/vllm_env/args_check.py).
#
#   containers/vllm-loader-env.sh .venv-vllm          # PROJECT_VENV=.venv by default
#
# What it holds: vllm 0.33.0 from PyPI installed --no-deps (the CUDA wheel: its compiled ops are not used on
# CPU), plus exactly the pure-Python/small requirements that vLLM's import chain for the config, model
# loader, serve argument parser and parser registries needs, all pinned. torch, transformers, numpy,
# pydantic, safetensors, tokenizers, aiohttp, openai... are NOT installed here: a .pth line adds the
# project venv's site-packages AFTER this venv's own, so they come from the project venv (torch 2.13.0+cpu,
# transformers 5.14.1). vLLM 0.33.0 declares torch==2.14.0 and transformers>=5.16.1 but does not check them
# at import; load_check.py shims the one torch-2.13 difference that bites (torch.accelerator.empty_cache).
# torchvision: the only torchvision on the index is a CUDA build; transformers' Qwen2-VL image processor (that
# Qwen3.5's vLLM module imports) only needs the import to succeed, so a stub package with a dist-info is
# written here.
#
# Safe to run again: a stamp (hash of this script + the project venv's torch/transformers versions) skips the
# work when nothing changed.
set -euo pipefail

venv=${1:?usage: $0 PATH}
project_venv=${PROJECT_VENV:-.venv}
python=${PYTHON:-}

project_python=$project_venv/bin/python
[ -x "$project_python" ] || { echo "no project venv at $project_venv (run .ci/setup first)" >&2; exit 1; }
project_site=$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Same interpreter as the project venv, so its compiled packages (torch) import here.
if [ -z "$python" ]; then
  python=$("$project_python" -c 'import sys; print(sys._base_executable)')
fi

stamp=$venv/.recipe-runner-vllm-env
want=$( { cat "$0"; "$project_python" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'; echo "$project_site"; } \
  | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pip=("$venv/bin/python" -m pip --disable-pip-version-check install -q --no-deps)

# vLLM and what its loader / serve-parser import chain needs that the project venv lacks. Where vLLM 0.33.0
# declares a pin or range (compressed-tensors, xgrammar, apache-tvm-ffi, fastapi, llguidance, starlette),
# the pin is inside it.
"${pip[@]}" \
  "vllm==0.33.0" \
  "compressed-tensors==0.17.0" \
  "xgrammar==0.2.8" \
  "apache-tvm-ffi==0.1.11" \
  "llguidance==1.7.6" \
  "fastapi==0.136.3" \
  "starlette==1.10.0" \
  "cbor2==6.3.0" \
  "pyzmq==27.3.0" \
  "msgspec==0.23.0" \
  "cloudpickle==3.1.3" \
  "cachetools==8.0.3" \
  "uvloop==0.23.0" \
  "py-cpuinfo==9.0.0" \
  "pybase64==1.5.1" \
  "prometheus_client==0.26.0" \
  "openai-harmony==0.0.8" \
  "opentelemetry-api==1.45.3" \
  "partial-json-parser==0.2.1.1.post7" \
  "einops==0.8.2" \
  "loguru==0.7.3" \
  "mistral_common==1.13.1" \
  "pydantic-extra-types==2.11.1" \
  "pycountry==26.2.16" \
  "tiktoken==0.14.0"

# torchvision stand-in: any `torchvision...` import succeeds (a finder makes the submodules) and yields
# placeholders that raise ImportError when called; a dist-info gives importlib.metadata a version.
# transformers takes torchvision as present once it is importable (find_spec), and then imports
# torchvision.io, torchvision.transforms.v2.functional... at module level, so the stand-in has to answer
# all of those, not just the top-level import.
rm -rf "$site/torchvision" "$site"/torchvision-*.dist-info
mkdir -p "$site/torchvision" "$site/torchvision-0.29.0.dist-info"
cat > "$site/torchvision/__init__.py" <<'PY'
"""Import-only stand-in for torchvision (recipe-runner's vLLM loader venv, CPU only).

transformers' and vLLM's vision processors import torchvision at module level; checking that a text
checkpoint loads never runs them. Every torchvision.* module imports; every name in one is a placeholder
that raises ImportError when called."""
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.29.0"


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"torchvision stand-in: {self._name} is not available in this venv")

    def __repr__(self):
        return f"<torchvision stand-in {self._name}>"


def _module_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{module_name}.{name}")

    return __getattr__


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []
        module.__getattr__ = _module_getattr(module.__name__)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


sys.meta_path.append(_Finder())
__getattr__ = _module_getattr(__name__)
PY
cat > "$site/torchvision-0.29.0.dist-info/METADATA" <<'EOF'
Metadata-Version: 2.1
Name: torchvision
Version: 0.29.0
Summary: import-only stand-in written by recipe-runner containers/vllm-loader-env.sh
EOF
printf 'torchvision/__init__.py,,\ntorchvision-0.29.0.dist-info/METADATA,,\ntorchvision-0.29.0.dist-info/RECORD,,\n' \
  > "$site/torchvision-0.29.0.dist-info/RECORD"
echo "recipe-runner" > "$site/torchvision-0.29.0.dist-info/INSTALLER"

# The project venv's packages, after this venv's own (a plain path line: its .pth files are not run).
echo "$(cd "$project_site" && pwd)" > "$site/zz_recipe_runner_project_venv.pth"

# Smoke test: vLLM resolves the CPU platform and its loader and serve parser import.
VLLM_TARGET_DEVICE=cpu VLLM_LOGGING_STREAM=ext://sys.stderr "$venv/bin/python" -c '
import vllm
from vllm.platforms import current_platform
from vllm.model_executor.model_loader import get_model_loader
from vllm.entrypoints.common.cli_args import make_arg_parser
import vllm.model_executor.models.qwen3_5  # needs the torchvision stand-in
assert current_platform.is_cpu(), current_platform
' 2>"$venv/smoke.log" || { echo "vllm does not import in $venv:" >&2; tail -20 "$venv/smoke.log" >&2; exit 1; }
echo "$want" > "$stamp"
