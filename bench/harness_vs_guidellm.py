"""Our benchmark harness and GuideLLM side by side, against a loopback server with known delays.

The scripted server streams the first token after --ttft seconds and each next one --itl seconds
later, and logs when it really wrote each chunk. Both clients measure it; the medians should agree
within a few milliseconds (GuideLLM's ITL is a per-request average, ours is per gap).

    python bench/harness_vs_guidellm.py --guidellm /path/to/venv/bin/guidellm [--requests 20]

GuideLLM (PyPI `guidellm`) is not a dependency: install it in a separate environment (with a CPU
torch first, or it pulls a CUDA build).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from runner.benchmark.harness import stream_chat, summarize
from runner.testing.scripted_server import ScriptedServer, ServerThread


async def ours(url: str, model: str, requests: int) -> dict:
    async with aiohttp.ClientSession() as session:
        results = [await stream_chat(session, url, model, [{"role": "user", "content": f"[words:20] q{i}"}], 32)
                   for i in range(requests)]
    return summarize(results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--guidellm", required=True)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--ttft", type=float, default=0.2)
    parser.add_argument("--itl", type=float, default=0.02)
    args = parser.parse_args()
    server = ScriptedServer(ttft_s=args.ttft, itl_s=args.itl)
    with ServerThread(server) as srv, tempfile.TemporaryDirectory() as tmp:
        mine = asyncio.run(ours(srv.url, srv.model, args.requests))
        logged = srv.stream_log[-args.requests:]
        server_itl = statistics.median(b - a for log in logged for a, b in zip(log["sent"], log["sent"][1:],
                                                                              strict=False)) * 1000
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"[words:20] g{i}", "output_tokens_count": 32}) + "\n"
                                   for i in range(args.requests)))
        out = Path(tmp) / "out.json"
        subprocess.run([args.guidellm, "run", "--backend",
                        f"kind=openai_http,target={srv.url.removesuffix('/v1')},model={srv.model},"
                        "request_format=/v1/chat/completions", "--profile", "kind=synchronous",
                        "--constraint", f"kind=max_requests,count={args.requests}",
                        "--data", f"kind=json_file,path={prompts}", "--output", f"kind=json,path={out}",
                        "--disable-progress"], check=True, capture_output=True,
                       env=os.environ | {"HF_HUB_OFFLINE": "1"})
        metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    g_ttft = metrics["time_to_first_token_ms"]["successful"]["median"]
    g_itl = metrics["inter_token_latency_ms"]["successful"]["median"]
    print(f"server asked: TTFT {args.ttft * 1000:.1f} ms, ITL {args.itl * 1000:.1f} ms; server logged ITL median "
          f"{server_itl:.2f} ms")
    print("| metric (median) | recipe-runner | GuideLLM | difference |")
    print("|---|---|---|---|")
    print(f"| TTFT ms | {mine['ttft_p50_ms']:.2f} | {g_ttft:.2f} | {mine['ttft_p50_ms'] - g_ttft:+.2f} |")
    print(f"| ITL ms | {mine['itl_p50_ms']:.2f} | {g_itl:.2f} | {mine['itl_p50_ms'] - g_itl:+.2f} |")


if __name__ == "__main__":
    main()
