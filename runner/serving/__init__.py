"""Serving engines: what starts a candidate's OpenAI-compatible server, and what each engine asks of
an export, of the plan and of the card.

engine.py holds the interface and the registry; vllm.py and local.py implement it, and are
registered here, so that importing anything of runner.serving knows them. server.py has what every
engine's server shares (ports, the health wait, RunningServer). The verify rules an engine names are
plain data in runner/quantization/verify_rules.py, which the worker reads without this package.
"""

from runner.serving.engine import register
from runner.serving.local import LocalEngine
from runner.serving.vllm import VllmEngine

register(VllmEngine())
register(LocalEngine())
