"""A loopback stand-in for the Hugging Face Hub API that records every call huggingface_hub makes.

It implements what `HfApi.create_repo` and `HfApi.upload_folder` need for small files: repository
creation, the pre-upload check (answering "regular" so files travel inline, not through LFS or
Xet), and the commit (NDJSON). Point huggingface_hub at it with HF_ENDPOINT. Tests use it to check
what would reach the Hub, and that the token is sent only in the Authorization header.
"""

from __future__ import annotations

import base64
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeHub:
    calls: list[dict[str, Any]] = field(default_factory=list)
    uploaded: dict[str, bytes] = field(default_factory=dict)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeHub:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        self.calls.append({"method": request.method, "path": path,
                           "authorization": request.headers.get("Authorization"), "bytes": len(body)})
        if path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data.get('organization') or ''}/{data['name']}".strip("/")
            return web.json_response({"url": f"{self.url}/{repo}", "name": repo})
        if path == "/api/validate-yaml":  # the card's metadata is checked before upload
            return web.json_response({})
        if path == "/api/agent-harnesses":  # a client-side feature probe; nothing to offer
            return web.json_response([])
        if "/preupload/" in path:
            files = json.loads(body).get("files", [])
            return web.json_response({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                for f in files]})
        if "/commit/" in path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    self.uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            return web.json_response({"commitUrl": f"{self.url}/{repo}/commit/0123abc",
                                      "commitOid": "0123abc0123abc0123abc0123abc0123abc0123"})
        return web.json_response({"error": f"fake hub: no route for {request.method} {path}"}, status=404)
