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
