"""An OpenAI-compatible chat client for the teacher: timeouts, retries with backoff, a clear first failure.

Retried: connection errors, timeouts, 429 (honouring Retry-After) and 5xx, up to `retries` times
with exponential backoff. Any other HTTP error fails that request at once. The API key, if any, is
read from the environment variable the recipe names and never appears in errors or logs.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from runner.errors import RunnerError

RETRY_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 20.0


class TeacherError(Exception):
    """A request that failed for good; `reason` is a short counted label (e.g. http_400, timeout)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class TeacherClient:
    endpoint: str
    model: str
    session: aiohttp.ClientSession
    timeout_s: float = 120.0
    retries: int = 4
    api_key_env: str | None = None
    retried: int = 0  # how many retries happened, for the record

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
            try:
                async with self.session.post(self._url("/chat/completions"), json=body, headers=self._headers,
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                    if resp.status == 200:
                        data = await resp.json(content_type=None)
                        return _first_message(data)
                    text = (await resp.text())[:200]
                    if resp.status not in RETRY_STATUSES or attempt >= self.retries:
                        raise TeacherError(f"http_{resp.status}", text)
                    delay = _retry_after(resp) or _backoff(attempt)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                if attempt >= self.retries:
                    reason = "timeout" if isinstance(exc, TimeoutError) else "connection"
                    raise TeacherError(reason, f"{type(exc).__name__} after {attempt + 1} attempts") from None
                delay = _backoff(attempt)
            attempt += 1
            self.retried += 1
            await asyncio.sleep(delay)


def _first_message(data: Any) -> dict[str, Any]:
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise TeacherError("bad_response", "no choices[0].message in the teacher's answer") from None
    if not isinstance(message, dict):
        raise TeacherError("bad_response", "choices[0].message is not an object")
    return message


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return min(BACKOFF_MAX_S, float(value)) if value is not None else None
    except ValueError:
        return None
