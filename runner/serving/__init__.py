"""Serving engines: what starts a candidate's OpenAI-compatible server, and what each engine asks of
an export, of the plan and of the card.

engine.py holds the interface and the registry; vllm.py and local.py implement it; server.py has
what every engine's server shares (ports, the health wait, RunningServer). verify_rules.py is the
plain data the verify worker reads. This package imports nothing at import time: the worker reads
verify_rules.py without loading any engine.
"""
