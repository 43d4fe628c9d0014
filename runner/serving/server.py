"""What every engine's server shares: the RunningServer an engine yields, a port to listen on, the wait
until it answers /health, and the check that the server on the port is the one this step started.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from runner.errors import RunnerError


@dataclass
class RunningServer:
    url: str  # base URL ending in /v1
    model: str  # the name to send as "model"
    engine: str  # the engine's name ("endpoint": the user's own server, which no engine started)
    numerics_on_health: bool = False  # GET /health says what it computes with (the local engine does)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_port(wanted: int | None) -> int:
    """`serve.port` when it is free, else a clear error; a free port when the recipe names none."""
    if wanted is None:
        return free_port()
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            raise RunnerError(f"serve.port {wanted} is in use by another process on this machine; stop it, pick "
                              "another port, or leave serve.port unset to use a free one") from None
    return wanted


async def wait_healthy(base: str, timeout_s: float, proc: asyncio.subprocess.Process | None, log_path: Path,
                       health: str = "/health", container: object | None = None, interval_s: float = 0.5,
                       token: str | None = None) -> float:
    """Seconds until GET /health answers 200 (asked every interval_s); a clear error with the log's
    tail when it never does. With `token`, the answer must echo it: a server on the port that is not
    the one we started (another process got there first) is an error, never measured."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - t0 < timeout_s:
            if proc is not None and proc.returncode is not None:
                raise RunnerError(f"the server exited with status {proc.returncode} before answering; "
                                  f"last lines of {log_path}:\n      " + log_tail(log_path))
            if container is not None:
                await asyncio.to_thread(container.reload)  # type: ignore[attr-defined]
                if container.status in ("exited", "dead"):  # type: ignore[attr-defined]
                    logs = (await asyncio.to_thread(container.logs, tail=12)).decode(errors="replace")  # type: ignore[attr-defined]
                    raise RunnerError("the server container exited before answering; its last lines:\n      "
                                      + "\n      ".join(logs.splitlines()))
            try:
                async with session.get(f"{base}{health}", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        if token is not None:
                            echoed = await _echoed_token(resp)
                            if echoed != token:
                                raise RunnerError(
                                    f"something else answers {base}{health} (it does not echo this run's server "
                                    f"token: {'a different token' if echoed else 'no token'}); another process "
                                    "listens on that port: stop it or change serve.port")
                        return time.monotonic() - t0
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(interval_s)
    if container is not None:
        logs = (await asyncio.to_thread(container.logs, tail=12)).decode(errors="replace")  # type: ignore[attr-defined]
        raise RunnerError(f"the server container did not answer {health} within {timeout_s:.0f}s; its last lines:"
                          "\n      " + "\n      ".join(logs.splitlines()))
    raise RunnerError(f"the server did not answer /health within {timeout_s:.0f}s (serve.startup_timeout_s); "
                      f"last lines of {log_path}:\n      " + log_tail(log_path))


async def _echoed_token(resp: aiohttp.ClientResponse) -> str | None:
    try:
        body = await resp.json(content_type=None)
    except ValueError:
        return None
    return body.get("token") if isinstance(body, dict) else None


async def check_served_name(base_v1: str, name: str) -> None:
    """A vLLM server lists the name it was started with; anything else on the port does not."""
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"{base_v1}/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.json(content_type=None)
        names = [m.get("id") for m in body.get("data", [])] if isinstance(body, dict) else []
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        names = []
    if name not in names:
        raise RunnerError(f"the server at {base_v1} does not serve {name!r} (it lists {names or 'nothing'}): it is "
                          "not the one this step started; is another server on that port?")


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n      ".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# vLLM's speculative-decoding counters on its Prometheus /metrics (vllm/v1/spec_decode/metrics.py, vLLM 0.33.0:
# Counters "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens",
# exposed by prometheus_client with the `_total` suffix, one series per engine/model label set).
SPEC_DECODE_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
}


def parse_counters(text: str, names: dict[str, str]) -> dict[str, float]:
    """The Prometheus text exposition's samples of each named counter, summed over their label sets; a counter
    the text does not have is absent from the answer."""
    wanted = {metric: key for key, metric in names.items()}
    found: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in wanted:
            continue
        try:
            rest = line.rsplit("}", 1)[1] if "{" in line else line[len(name):]
            value = float(rest.split()[0])  # `name{labels} value [timestamp]`
        except (IndexError, ValueError):
            continue
        found[wanted[name]] = found.get(wanted[name], 0.0) + value
    return found


async def spec_decode_counters(session: aiohttp.ClientSession, server: RunningServer) -> dict[str, float] | None:
    """The server's speculative-decoding counters now (GET /metrics at the server root), or None when it exposes
    no metrics or not these (a server that does not speculate, the local engine, a user's endpoint)."""
    url = server.url.removesuffix("/v1") + "/metrics"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return None
    counters = parse_counters(text, SPEC_DECODE_COUNTERS)
    return counters if set(counters) == set(SPEC_DECODE_COUNTERS) else None


def draft_acceptance(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float | int] | None:
    """The draft acceptance over the requests between two readings of the counters: accepted / proposed draft
    tokens, and vLLM's mean acceptance length (1 + accepted / drafts: tokens emitted per target step). None when
    either reading is missing or no draft was proposed in between (the server did not speculate): never 0 for
    "not measured"."""
    if before is None or after is None:
        return None
    delta = {key: after[key] - before[key] for key in SPEC_DECODE_COUNTERS}
    if delta["draft_tokens"] <= 0 or delta["drafts"] <= 0 or min(delta.values()) < 0:
        return None  # nothing proposed, or the counters went back (a restarted server): not this benchmark's
    return {"acceptance_rate": round(delta["accepted_tokens"] / delta["draft_tokens"], 4),
            "mean_acceptance_length": round(1 + delta["accepted_tokens"] / delta["drafts"], 3),
            "drafts": int(delta["drafts"]), "draft_tokens": int(delta["draft_tokens"]),
            "accepted_tokens": int(delta["accepted_tokens"])}
