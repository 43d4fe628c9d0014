"""An OpenAI-compatible chat client for the teacher: deadlines, retries with backoff, a circuit
breaker, bounded replies, and failures that name the endpoint.

Retried: connection errors, timeouts, 429 (honouring Retry-After), 5xx, and replies that are not the
JSON of a chat completion (an HTML error page from a proxy, a reply cut short), up to `retries` times
with exponential backoff. Any other HTTP error and a reply over `max_reply_bytes` fail that request at
once. Each attempt has a deadline from sending to the last byte, so a server that accepts the
connection and stays silent costs `timeout_s`, not forever. After `circuit_breaker` failed attempts
in a row (no success between them) every request stops: the teacher is down, and the step says so
instead of spending hours on it. The API key, if any, is read from the environment variable the
recipe names and never appears in errors or logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from runner.errors import RunnerError

RETRY_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 20.0
CONNECT_TIMEOUT_S = 10.0


class TeacherError(Exception):
    """A request that failed for good; `reason` is a short counted label (e.g. http_400, timeout)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, delay: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.delay = reason, detail, delay


@dataclass
class TeacherClient:
    endpoint: str
    model: str
    session: aiohttp.ClientSession
    timeout_s: float = 120.0
    retries: int = 4
    api_key_env: str | None = None
    circuit_breaker: int = 12
    max_reply_bytes: int = 8 * 1024 * 1024
    log: logging.Logger | None = None
    retried: int = 0  # how many retries happened, for the record
    failed_in_a_row: int = 0
    broken: str | None = None  # why the circuit breaker opened

    @property
    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _url(self, path: str) -> str:
        return self.endpoint.rstrip("/") + path

    async def check_reachable(self) -> None:
        """Fail fast, before any generation, when the teacher does not answer at all."""
        try:
            async with self.session.get(self._url("/models"), headers=self._headers,
                                        timeout=aiohttp.ClientTimeout(total=min(self.timeout_s, 15))) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RunnerError(f"the teacher at {self.endpoint} is unreachable ({type(exc).__name__}: {exc}); "
                              "start it, or fix calibration.source.endpoint") from None

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                   sampling: dict[str, Any]) -> dict[str, Any]:
        """The assistant message of one chat completion."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False}
        body.update({k: v for k, v in sampling.items() if k != "extra_body"})
        body.update(sampling.get("extra_body") or {})
        if tools:
            body["tools"] = tools
        attempt = 0
        while True:
            if self.broken:
                raise TeacherError("circuit_open", self.broken)
            try:
                message = await self._attempt(body)
            except _Retryable as exc:
                self._failed(exc.reason, exc.detail)
                if attempt >= self.retries:
                    raise TeacherError(exc.reason, f"{exc.detail} (after {attempt + 1} attempts)") from None
                delay = exc.delay if exc.delay is not None else _backoff(attempt)
                if self.log:
                    self.log.warning("teacher %s: %s; retrying in %.1fs", self.endpoint, exc.detail, delay)
                attempt += 1
                self.retried += 1
                await asyncio.sleep(delay)
                continue
            except TeacherError as exc:
                self._failed(exc.reason, str(exc))
                raise
            self.failed_in_a_row = 0
            return message

    def _failed(self, reason: str, detail: str) -> None:
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= self.circuit_breaker and not self.broken:
            self.broken = (f"the teacher at {self.endpoint} failed {self.failed_in_a_row} attempts in a row "
                           f"(last: {detail}); check that it is up and answering, then run again: what was "
                           "generated is kept (calibration.source.circuit_breaker sets the limit)")

    async def _attempt(self, body: dict[str, Any]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        try:
            async with self.session.post(self._url("/chat/completions"), json=body, headers=self._headers,
                                         timeout=timeout) as resp:
                if resp.status != 200:
                    text = (await resp.content.read(300)).decode("utf-8", errors="replace")[:200]
                    if resp.status in RETRY_STATUSES:
                        raise _Retryable(f"http_{resp.status}", f"{self.endpoint} answered {resp.status}: {text}",
                                         _retry_after(resp))
                    raise TeacherError(f"http_{resp.status}", f"{self.endpoint} answered {resp.status}: {text}")
                raw = await self._read_capped(resp)
        except TimeoutError:
            raise _Retryable("timeout", f"{self.endpoint} sent no complete reply within {self.timeout_s:g}s "
                             "(calibration.source.timeout_s)") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable("connection", f"{self.endpoint}: {type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            start = raw[:80].decode("utf-8", errors="replace")
            raise _Retryable("bad_json", f"{self.endpoint} answered with something that is not JSON "
                             f"({len(raw)} bytes, starting {start!r})") from None
        return _first_message(data, self.endpoint)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, refused as soon as it passes max_reply_bytes (never held whole in memory)."""
        declared = resp.content_length
        if declared is not None and declared > self.max_reply_bytes:
            raise TeacherError("too_large", f"{self.endpoint} sent a {declared}-byte reply, over "
                               f"max_reply_bytes {self.max_reply_bytes}")
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise TeacherError("too_large", f"{self.endpoint} sent a reply over max_reply_bytes "
                                   f"{self.max_reply_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)


def _first_message(data: Any, endpoint: str) -> dict[str, Any]:
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise _Retryable("bad_response", f"{endpoint}: no choices[0].message in the reply") from None
    if not isinstance(message, dict):
        raise _Retryable("bad_response", f"{endpoint}: choices[0].message is not an object")
    return message


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return min(BACKOFF_MAX_S, float(value)) if value is not None else None
    except ValueError:
        return None
