"""The tensors of a safetensors checkpoint, read from the file headers alone (no torch, no weights read)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from runner.quantization.bits import DTYPE_BITS


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # safetensors dtype: BF16, F32, U8, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * int(DTYPE_BITS.get(self.dtype, 16)) // 8


def has_safetensors(folder: Path | None) -> bool:
    return folder is not None and any(Path(folder).glob("*.safetensors"))


def read_headers(folder: Path) -> dict[str, Tensor]:
    """Every tensor of every *.safetensors file in `folder` (sharded or not), from the headers alone."""
    tensors: dict[str, Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                tensors[name] = Tensor(name, info["dtype"], tuple(info["shape"]))
    return tensors


def check_files(folder: Path) -> list[str]:
    """What is wrong with the *.safetensors files of a folder, file by file, from their headers and sizes
    alone: a header that is not one, tensors whose data runs past the end of the file (a truncated
    copy or download), no weights at all. Empty when the checkpoint is whole."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return [f"{folder} holds no *.safetensors file"]
    problems = []
    for file in files:
        size = file.stat().st_size
        try:
            with file.open("rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ValueError("shorter than a safetensors header")
                (length,) = struct.unpack("<Q", raw)
                if length > size - 8:
                    raise ValueError(f"its header claims {length} bytes, the file has {size}")
                header = json.loads(fh.read(length))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            end = max((int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
            problems.append(f"{file}: not a readable safetensors file ({exc})")
            continue
        if 8 + length + end > size:
            problems.append(f"{file}: truncated: its tensors need {8 + length + end} bytes, the file has {size} "
                            f"({8 + length + end - size} missing); copy or download it again")
    return problems
