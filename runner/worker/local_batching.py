"""The local engine's batch: the requests it decodes together, one token each per forward pass.

Continuous batching with a hand-written decode loop over transformers' DynamicCache: a request is
prefilled alone (batch of one, no padding: the same computation as when it is the only request),
its cache is then left-padded to the batch's length (or the batch's to its) and joins the batch;
each step feeds every row its last token at its own position, and each row's attention reads only
its own keys (row_attention); a finished or abandoned row leaves the batch at once (its cache rows
are dropped, and padding no row needs any more is cut), so it stops costing compute.

Why greedy answers do not depend on the company a request keeps: rows meet only in the matmuls'
batch dimension, where on the CPU the bf16 GEMMs give each row the same bits at any batch size
(bench/local_engine_throughput.py and tests/test_local_batching.py compare token for token);
attention runs per row, unpadded. Token choice, penalties and stop strings are per row. On a GPU,
cuBLAS picks kernels by batch size, so there a batched answer can differ from the lone one in the
last bits (unmeasured here).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One request in the engine. `finished` is called on the generator thread when the job ends
    (tokens and error are final then); the streamer gets each token as it is chosen."""

    ids: Any  # [1, prompt] token ids, on the CPU
    request: Any  # local_server.ChatRequest
    streamer: Any
    cancel: threading.Event
    finished: Callable[[], None]
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    length: int = 0  # tokens in this row's cache (prompt + fed back)
    done: bool = False

    @property
    def prompt_len(self) -> int:
        return int(self.ids.shape[-1])


def _pad_left(tensor: Any, width: int) -> Any:
    import torch

    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


class Batch:
    """The rows being decoded: their jobs and one DynamicCache [rows, heads, width, dim] per layer, each
    row's keys right-aligned (left padding of zeros that row_attention never reads)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.cache: Any = None

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def width(self) -> int:
        return 0 if self.cache is None else int(self.cache.layers[0].keys.shape[-2])

    def add(self, job: Job, cache: Any) -> None:
        """Join a prefilled row (its cache holds job.length positions, no padding)."""
        import torch

        if not self.jobs:
            self.jobs, self.cache = [job], cache
            return
        grow, pad = max(0, job.length - self.width), max(0, self.width - job.length)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys, pad)])
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(theirs.values, pad)])
        self.jobs.append(job)

    def keep(self, rows: list[int]) -> None:
        """Keep these rows only, and cut the padding columns no remaining row needs."""
        import torch

        if len(rows) == len(self.jobs):
            return
        if not rows:
            self.jobs, self.cache = [], None
            return
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        cut = self.width - max(self.jobs[i].length for i in rows)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]
        self.jobs = [self.jobs[i] for i in rows]


# The keys each row of a decode step attends to (its last N), set by the engine around the step; on
# the generator thread only.
ROWS = threading.local()
ROW_ATTENTION = "local_rows"


def row_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
                  ) -> tuple[Any, None]:
    """SDPA for each row over its own keys, as if it were alone. Padding masked in one batched SDPA
    is not enough: the kernel's reductions run over the padded length, and the last bits of a row's
    output (then, now and then, a greedy token) change with the padding its batch-mates need."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    valid = getattr(ROWS, "valid", None)
    if query.shape[2] != 1 or valid is None:  # a prefill: one request, no padding, causal
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    outs = [sdpa_attention_forward(module, query[r:r + 1], key[r:r + 1, :, -n:].contiguous(),
                                   value[r:r + 1, :, -n:].contiguous(), None, **kwargs)[0]
            for r, n in enumerate(valid)]
    return torch.cat(outs), None


def use_row_attention(model: Any, cache: Any) -> str | None:
    """Switch the model to row_attention when its requests can be batched; else say why not
    (sliding windows, linear attention, an attention other than SDPA: one request at a time)."""
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        return f"{type(cache).__name__} has no per-layer key/value tensors"
    kinds = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if kinds:
        return f"cache layers {', '.join(sorted(kinds))} cannot be left-padded"
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"attention implementation {implementation!r} (batching needs sdpa)"
    AttentionInterface.register(ROW_ATTENTION, row_attention)
    model.set_attn_implementation(ROW_ATTENTION)
    return None


def choose_token(logits: Any, request: Any, generated: list[int]) -> int:
    """The next token from one row's logits (float32, on the CPU) as transformers' generate chooses
    it: presence/frequency penalties on the tokens generated so far, then greedy, or temperature
    and top-p sampling (torch's global generator, seeded at start)."""
    import torch

    scores = logits
    if (request.presence_penalty or request.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(generated), minlength=scores.shape[-1]).to(scores.dtype)
        scores = scores - request.frequency_penalty * counts - request.presence_penalty * (counts > 0).to(scores.dtype)
    if request.temperature <= 0:
        return int(scores.argmax())
    scores = scores / request.temperature
    if request.top_p < 1:  # as TopPLogitsWarper: drop the least likely tokens summing to at most 1 - top_p
        ordered, order = scores.sort()
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - request.top_p
        drop[-1] = False  # keep at least one
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1))


def stop_window(stops: list[str]) -> int:
    """How many of the last tokens to decode to see any stop string that the last token completes
    (a token is at least one byte; a few more for bytes a character spans)."""
    return max((len(s.encode()) for s in stops), default=0) + 4
