"""Serving engines: what starts a candidate's OpenAI-compatible server, and what each engine asks of
an export, of the plan and of the card.

engine.py holds the interface and the registry; vllm.py and local.py implement it, and are
registered here, so that importing anything of runner.serving knows them. server.py has what every
engine's server shares (ports, the health wait, RunningServer). The verify rules an engine names are
plain data in runner/quantization/verify_rules.py, which the worker reads without this package.

Steps import from this package (`from runner.serving import serving`), not from engine.py: a step's
cache key hashes the modules it imports (runner/steps/code.py), and through this file that is every
engine. The recipe schema and vllm_env read engine.py's registry directly (they are below the engines).
"""

from runner.serving.engine import Engine, engine_for, kernel_path, known_engines, register, serving
from runner.serving.local import LocalEngine
from runner.serving.vllm import VllmEngine

__all__ = ["Engine", "engine_for", "kernel_path", "known_engines", "register", "serving"]

register(VllmEngine())
register(LocalEngine())
