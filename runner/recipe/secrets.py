"""What a secret looks like, in one place: environment variable names, values written in a recipe, and files
a recipe would read into a checkpoint or an upload would carry.

Secrets never enter a recipe (it is copied into its run directory, logs and model card), a checkpoint or a
Hub upload. The loader refuses secret-named `${env:...}` variables and token-shaped values; the export's
fix-ups and the publish step refuse secret files by name (the Hugging Face token file, .netrc,
.git-credentials, ssh keys, .env) and by content (a token or private key inside any file).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

KeyPath = tuple[str | int, ...]

# Names: what huggingface_hub, OpenAI-style clients and CI systems call their secrets (HF_TOKEN,
# OPENAI_API_KEY, ANTHROPIC_KEY, GITHUB_PAT, HF_AUTH ...); HF_* is a secret unless it is one of the
# hub's known settings.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL|_KEY$|^KEY$|_PAT$|(^|_)AUTH",
                          re.IGNORECASE)
_HF_SETTINGS = frozenset({"HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_DATASETS_OFFLINE",
                          "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_DISABLE_TELEMETRY", "HF_DATASETS_CACHE",
                          "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT", "HF_XET_HIGH_PERFORMANCE"})
# Values: the shapes of tokens (Hugging Face, OpenAI/Anthropic-style, GitHub, AWS, Slack, JWTs) and of
# private keys (PEM, OpenSSH, PuTTY).
_TOKENS = (r"hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|"
           r"AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9-]{10,}|"
           r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")
_KEYS = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----|PuTTY-User-Key-File-\d"
_SECRET_VALUE = re.compile(rf"\b({_TOKENS})|{_KEYS}")
# The same shapes over bytes. A leading \b makes Python's regex engine 3x slower on binary data (35 against
# 110 MB/s), so the word boundary before a token is checked on each match instead.
_SECRET_BYTES = re.compile(rf"({_TOKENS})|{_KEYS}".encode())
_WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

# Files that hold credentials whatever their content looks like.
_SECRET_FILES = frozenset({".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc", ".env"})
_SSH_KEY = re.compile(r"^id_(rsa|dsa|ecdsa|ed25519|xmss)(_sk)?$")
_SECRET_FOLDERS = frozenset({".ssh", ".gnupg", ".aws"})
_HF_TOKEN_FILES = frozenset({"token", "stored_tokens"})
_HF_FOLDERS = frozenset({"huggingface", ".huggingface"})

_CHUNK = 16 << 20
_OVERLAP = 256  # longer than the shortest match of every shape, so none is cut in two between chunks
_MAX_SAFETENSORS_HEADER = 100 << 20  # what the safetensors format itself allows


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return bool(_SECRET_NAME.search(upper)) or (upper.startswith("HF_") and upper not in _HF_SETTINGS)


def secret_values(data: Any, path: KeyPath = ()) -> list[KeyPath]:
    """The key paths of string values shaped like a token or a private key."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in secret_values(v, (*path, k))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in secret_values(v, (*path, i))]
    return [path] if isinstance(data, str) and _SECRET_VALUE.search(data) else []


def secret_name(path: Path) -> str | None:
    """Why the file at `path` is a secret by its name (or, for a symbolic link, the name of what it points
    at), or None. The file need not exist."""
    for candidate in dict.fromkeys((Path(os.path.abspath(path.expanduser())), path.expanduser().resolve())):
        why = _secret_by_name(candidate)
        if why:
            return why
    return None


def secret_file(path: Path) -> str | None:
    """Why the file at `path` must not go into a checkpoint or an upload, or None.

    Judged by its name and, for a symbolic link, the name of what it points at (the Hugging Face token
    file, .netrc, .git-credentials, ssh keys, .env, anything in ~/.ssh, ~/.aws ...), then by its content:
    a token or a private key anywhere in it. A safetensors file is judged by its header, the only text it
    holds (tensor data is numbers); a file that is not valid safetensors is read whole. The reason never
    quotes the secret."""
    why = secret_name(path)
    if why:
        return why
    try:
        kind = _secret_content(path)
    except OSError as exc:
        return f"it cannot be read to check for secrets ({exc.strerror or exc})"
    return f"it holds {kind}" if kind else None


def _secret_by_name(path: Path) -> str | None:
    name = path.name
    if name in _SECRET_FILES or name.startswith(".env."):
        return f"{name} is a credentials file"
    if _SSH_KEY.match(name):
        return f"{name} is an ssh private key"
    folders = set(path.parent.parts)
    if folders & _SECRET_FOLDERS:
        return f"it is in {sorted(folders & _SECRET_FOLDERS)[0]}, a folder of credentials"
    if path.parent.name == ".docker" and name == "config.json":  # registry logins
        return "it is Docker's login file (.docker/config.json)"
    # The Hugging Face login: `token` (and `stored_tokens`) directly in HF_HOME (~/.cache/huggingface, or
    # ~/.huggingface before huggingface_hub 0.14), or at HF_TOKEN_PATH. A file named `token` elsewhere is
    # judged by its content.
    if name in _HF_TOKEN_FILES:
        hf_home = os.environ.get("HF_HOME")
        token_path = os.environ.get("HF_TOKEN_PATH")
        if (path.parent.name in _HF_FOLDERS or (hf_home and path.parent == Path(hf_home).expanduser().resolve())
                or (token_path and path == Path(token_path).expanduser().resolve())):
            return f"it is the Hugging Face login's {name} file"
    return None


def _describe(match: re.Match[bytes]) -> str:
    text = match.group(0)
    if text.startswith(b"hf_"):
        return "a Hugging Face token"
    if match.group(1) is None:
        return "a private key"
    return "a token or API key"


def _search(data: bytes) -> str | None:
    """The kind of the first secret in `data`."""
    for match in _SECRET_BYTES.finditer(data):
        start = match.start()
        if match.group(1) is not None and start and data[start - 1] in _WORD:
            continue  # a token needs a word boundary before it, as in _SECRET_VALUE
        return _describe(match)
    return None


def _secret_content(path: Path) -> str | None:
    with path.open("rb") as fh:
        if path.suffix == ".safetensors":
            head = fh.read(8)
            if len(head) == 8:
                (length,) = struct.unpack("<Q", head)
                size = path.stat().st_size
                if length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
                    header = fh.read(length)
                    if header.lstrip().startswith(b"{"):
                        return _search(header)
            fh.seek(0)
        tail = b""
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return None
            data = tail + chunk
            found = _search(data)
            if found:
                return found
            tail = data[-_OVERLAP:]
