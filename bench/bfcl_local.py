"""BFCL on the models of a finished run, through the local engine: the source and every exported candidate,
each candidate paired with the source on the same items (rates, flips, Newcombe's interval).

    PYTHONPATH=. python bench/bfcl_local.py RUN_DIR [--n 120] [--categories simple_python irrelevance ...]

The demo model (SmolLM2-135M-Instruct) ships a chat template without a tools section, and the local
engine refuses tools for such a template rather than drop them. This script serves copies of the
folders (weights linked, nothing in RUN_DIR written) whose template is ChatML with a Hermes-style tools
section, the format the `hermes` parser reads, so the model sees the tool definitions. SmolLM2 was not
trained to call tools: what this measures is how BFCL behaves on a small model (AST categories at the
floor, so their gates would be "not measurable"; irrelevance measurable), not a tool-calling score.

Needs bfcl-eval (docs/bfcl.md), torch, transformers, aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner.benchmark import bfcl  # noqa: E402
from runner.benchmark.gates import evaluate, recovery  # noqa: E402

# The flagship's BFCL gate (recipes/base/relative-gates.yaml): within 3 points of the source, paired.
GATE = {"name": "bfcl", "metric": "bfcl.pass_rate", "op": ">=", "value": None, "relative_to": "baseline",
        "margin": 0.03}

# ChatML with the tools block Qwen2.5/Hermes templates render (tool definitions as JSON in <tools>, calls
# answered inside <tool_call>...</tool_call>): what the hermes parser reads.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}You may call one or more functions to assist with the user query. Function signatures are in <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each function call, return a json object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}{% for message in messages %}{% if not (loop.first and message['role'] == 'system') %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""  # noqa: E501


def with_tools_template(model: Path, into: Path) -> Path:
    """A copy of a model folder (weights hard-linked or copied) whose chat template renders tools."""
    into.mkdir(parents=True)
    for item in model.iterdir():
        if item.name == "chat_template.jinja":
            continue
        target = into / item.name
        try:
            target.hardlink_to(item)
        except OSError:
            shutil.copy2(item, target)
    (into / "chat_template.jinja").write_text(TOOLS_TEMPLATE, encoding="utf-8")
    config = json.loads((into / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # the .jinja file is the template
    (into / "tokenizer_config.json").unlink()
    (into / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return into


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ask(model: Path, items: list[bfcl.BfclItem], threads: int, max_tokens: int, log: Path) -> dict:
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runner.worker.local_server", "--model", str(model),
                                 "--port", str(port), "--name", "bench", "--threads", str(threads)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
                try:
                    async with session.get(f"{base}/health"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.5)
            return await bfcl.run_bfcl(session, f"{base}/v1", "bench", items, 8, max_tokens=max_tokens)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--categories", nargs="+", default=["simple_python", "multiple", "irrelevance"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", help="only these exports (default: every one)")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    items = bfcl.load_items(args.categories, args.n, args.seed)
    models = {"source": args.run_dir / "steps" / "source" / "model"}
    for export in sorted((args.run_dir / "steps").glob("export.*")):
        if args.strategies is None or export.name.removeprefix("export.") in args.strategies:
            models[export.name.removeprefix("export.")] = export / "checkpoint"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in models.items():
            served = with_tools_template(folder, Path(tmp) / name)
            t0 = time.monotonic()
            result = asyncio.run(ask(served, items, args.threads, args.max_tokens, Path(tmp) / f"{name}.log"))
            results[name] = {"suites": {"bfcl": result}}
            cats = ", ".join(f"{c} {v['passed']}/{v['total']}" for c, v in result["per_category"].items())
            print(f"{name}: {result['passed']}/{result['total']} ({cats}) in {time.monotonic() - t0:.0f} s",
                  flush=True)
    print(f"\nBFCL {bfcl.bfcl_version()}, {len(items)} items of {', '.join(args.categories)} (seed {args.seed}), "
          "each candidate paired with the source:")
    print("| strategy | source | candidate | recovery | difference (95 %, paired) | flips | gate: within 3 points |")
    print("|---|---|---|---|---|---|---|")
    reasons = set()
    for name, result in results.items():
        if name == "source":
            continue
        (row,) = recovery(result, results["source"])
        lo, hi = row["difference"]
        recovered = f"{row['recovery_pct']:.1f} %" if row["recovery_pct"] is not None else "n/a"
        (verdict,) = evaluate([GATE], result, results["source"])
        reasons.add(verdict.get("reason"))
        print(f"| {name} | {row['baseline']:.3f} | {row['candidate']:.3f} | {recovered} | "
              f"[{lo * 100:+.1f}, {hi * 100:+.1f}] pts | -{row['lost']}/+{row['gained']} | {verdict['verdict']} |")
    for reason in sorted(r for r in reasons if r):
        print(f"\nnot measurable: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
