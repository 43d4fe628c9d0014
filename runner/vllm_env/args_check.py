"""Check `vllm serve` flags with vLLM's own argument parser and parser registries, starting nothing.

Runs inside the vLLM loader venv (containers/vllm-loader-env.sh):

    PYTHONPATH=<repo> <venv>/bin/python -m runner.vllm_env.args_check '["--tool-call-parser", "hermes", ...]'

(ARGS_JSON may also be a path to a file holding the JSON list, or "-" for stdin.) Prints one JSON object on
stdout: {"vllm_version", "ok", "errors": [{"flag", "message", "valid"}], "notes", "seconds"}; vLLM's logging goes to
stderr. The flags are parsed by the parser `vllm serve` builds (FlexibleArgumentParser +
vllm.entrypoints.common.cli_args.make_arg_parser), then vLLM's validate_parsed_serve_args runs, then the tool
call parser and reasoning parser names are looked up in ToolParserManager / ReasoningParserManager (what
validate_api_server_args does when the server starts; here the tool parser is checked even without
--enable-auto-tool-choice). Imports only the standard library and vllm (which brings torch/transformers).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time


class _ParseError(Exception):
    pass


def _read_args(spec: str) -> list[str]:
    if spec == "-":
        text = sys.stdin.read()
    elif spec.lstrip().startswith("["):
        text = spec
    else:
        with open(spec) as f:
            text = f.read()
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SystemExit("ARGS_JSON must be a JSON list of strings")
    return value


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})


def _flag_of(message: str, argv: list[str]) -> str | None:
    """argparse's messages name the flag as 'argument --x/-y: ...'."""
    if message.startswith("argument "):
        names = message[len("argument ") :].split(":", 1)[0]
        return names.split("/")[0]
    return next((a for a in argv if a.startswith("--") and a.split("=", 1)[0] in message), None)


def check(argv: list[str], notes: list[str]) -> list[dict]:
    from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message):  # argparse would print usage and exit(2)
            raise _ParseError(message)

        def exit(self, status=0, message=None):  # --help and friends
            raise _ParseError(message or f"argparse exit {status}")

    parser = make_arg_parser(Parser(prog="vllm serve", exit_on_error=False))
    options = _option_strings(parser)
    errors: list[dict] = []

    try:
        namespace, unknown = parser.parse_known_args(argv)
    except (_ParseError, argparse.ArgumentError) as exc:
        message = str(exc)
        flag = getattr(exc, "argument_name", None) or _flag_of(message, argv)
        return [{"flag": flag, "message": message, "valid": None}]

    for token in unknown:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            errors.append(
                {
                    "flag": name,
                    "message": f"unrecognized argument: {token}",
                    "valid": difflib.get_close_matches(name, options, n=5, cutoff=0.6) or None,
                }
            )
        else:
            errors.append({"flag": None, "message": f"unrecognized argument: {token}", "valid": None})
    if errors:
        return errors

    template = getattr(namespace, "chat_template", None)
    if template and os.path.isabs(template) and not os.path.exists(template):
        # A path inside the serving container (vLLM's image keeps its examples in /vllm-workspace): vLLM
        # checks it where it serves, not here. Said as a note, never as a pass or an error.
        notes.append(f"--chat-template {template} is not on this machine (a path inside the serving "
                     "container?): not checked here")
        namespace.chat_template = None
    try:
        validate_parsed_serve_args(namespace)
    except Exception as exc:
        message = str(exc)
        errors.append({"flag": _flag_of(message, argv), "message": f"{type(exc).__name__}: {message}", "valid": None})

    tool_parser = getattr(namespace, "tool_call_parser", None)
    valid_tools = ToolParserManager.list_registered()
    if tool_parser and tool_parser not in valid_tools:
        errors.append(
            {
                "flag": "--tool-call-parser",
                "message": f"unknown tool call parser {tool_parser!r}"
                + ("" if namespace.enable_auto_tool_choice
                   else " (vllm serve checks it only with --enable-auto-tool-choice)"),
                "valid": valid_tools,
            }
        )
    reasoning_parser = getattr(namespace, "reasoning_parser", None)
    valid_reasoning = ReasoningParserManager.list_registered()
    if reasoning_parser and reasoning_parser not in valid_reasoning:
        errors.append(
            {
                "flag": "--reasoning-parser",
                "message": f"unknown reasoning parser {reasoning_parser!r}",
                "valid": valid_reasoning,
            }
        )
    return errors


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    flags = _read_args(argv[0])

    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

    started = time.perf_counter()
    import vllm

    notes: list[str] = []
    errors = check(flags, notes)
    report = {
        "vllm_version": vllm.__version__,
        "ok": not errors,
        "errors": errors,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    out.write(json.dumps(report) + "\n")
    out.flush()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
