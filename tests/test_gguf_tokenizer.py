"""The GGUF source step keeps the tokenizer the GGUF declares (issue 30 item 1).

transformers' GGUF converters keep only some added tokens: the Qwen2 one keeps three fixed names
(a Qwen2.5 GGUF lost <tool_call>, </tool_call> and the FIM tokens, and eos became <|endoftext|>),
the Llama one drops USER_DEFINED tokens and takes eos from the bos id. Each test writes a real,
tiny GGUF (byte-level BPE vocabulary, one random layer) with gguf.GGUFWriter: seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import recipe, record

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

CONTROL, USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
# As a Qwen2.5 instruct GGUF declares them: CONTROL ones are special in Hugging Face terms, USER_DEFINED not.
ADDED = [("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL),
         ("<tool_call>", USER_DEFINED), ("</tool_call>", USER_DEFINED), ("<|fim_prefix|>", CONTROL),
         ("<|fim_middle|>", CONTROL), ("<|fim_suffix|>", CONTROL), ("<|fim_pad|>", CONTROL), ("<think>", USER_DEFINED)]
MERGES = ["h e", "l l", "Ġ w", "o r"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: the 256 base tokens of a byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_gguf(path: Path, arch: str, *, quantized: bool = False, duplicate: str | None = None) -> Path:
    """A tiny `arch` GGUF (qwen2 or llama) whose tokenizer has the ADDED tokens after 260 normal ones,
    bos/pad <|endoftext|>, eos <|im_end|> and a chat template. `quantized`: 2-D weights in Q8_0;
    `duplicate`: that string listed again as a normal token at the end (so it has two ids)."""
    import numpy as np

    tokens = byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for content, kind in ADDED:
        tokens.append(content)
        types.append(kind)
    if duplicate:
        tokens.append(duplicate)
        types.append(int(gguf.TokenType.NORMAL))
    ids = {t: i for i, t in enumerate(tokens) if t != duplicate or types[i] != int(gguf.TokenType.NORMAL)}
    hidden, ff, heads, kv_heads = 32, 64, 4, 2
    kv = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(ids["<|endoftext|>"])
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> None:
        data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if quantized and len(shape) == 2:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)

    weight("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    weight("blk.0.attn_q.weight", hidden, hidden)
    weight("blk.0.attn_k.weight", kv, hidden)
    weight("blk.0.attn_v.weight", kv, hidden)
    if arch == "qwen2":
        weight("blk.0.attn_q.bias", hidden)
        weight("blk.0.attn_k.bias", kv)
        weight("blk.0.attn_v.bias", kv)
    weight("blk.0.attn_output.weight", hidden, hidden)
    weight("blk.0.ffn_gate.weight", ff, hidden)
    weight("blk.0.ffn_up.weight", ff, hidden)
    weight("blk.0.ffn_down.weight", hidden, ff)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    weight("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def declared(path: Path) -> tuple[list[str], dict[str, int]]:
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    special = {name: reader.fields[f"tokenizer.ggml.{key}"].contents()
               for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"))}
    return tokens, special


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_every_added_token_of_the_gguf_survives_the_conversion_with_its_id(tmp_path, arch):
    from transformers import AutoTokenizer

    from runner.worker.convert_gguf import run

    path = write_gguf(tmp_path / f"{arch}.gguf", arch)
    tokens, special = declared(path)
    added = {tokens.index(content): (content, kind == CONTROL) for content, kind in ADDED}

    # BEFORE: transformers alone loses added tokens and takes another eos (what the step used to save).
    plain = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    lost = [content for i, (content, _) in added.items() if i not in plain.added_tokens_decoder]
    assert "<tool_call>" in lost and "</tool_call>" in lost and "<think>" in lost
    assert plain.eos_token_id != special["eos"]

    result = run({"path": str(path)}, tmp_path / "out")
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")  # as the next steps load it
    assert saved.convert_tokens_to_ids(tokens) == list(range(len(tokens)))
    assert len(saved) == len(tokens)
    assert {i: (str(t), t.special) for i, t in saved.added_tokens_decoder.items()} == added
    assert (saved.bos_token_id, saved.eos_token_id, saved.pad_token_id) == (special["bos"], special["eos"],
                                                                           special["pad"])
    assert saved.chat_template == TEMPLATE
    tool_call = tokens.index("<tool_call>")
    assert saved("a<tool_call>b")["input_ids"] == [tokens.index("a"), tool_call, tokens.index("b")]
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (special["bos"], special["eos"])
    summary = result["summary"]["tokenizer"]
    assert summary["vocab_size"] == len(tokens) and summary["added_tokens"] == len(ADDED)
    assert summary["special_tokens"]["eos"] == "<|im_end|>"
    repairs = "\n".join(summary["repairs"])
    assert all(repr(content) in repairs for content in lost)
    assert f"'<tool_call>' (id {tool_call})" in repairs and "eos token" in repairs


def test_an_added_token_that_cannot_keep_its_id_fails_the_conversion_naming_it(tmp_path):
    from runner.worker.convert_gguf import run

    # The vocabulary lists "<tool_call>" twice; the converter maps the string to the later, normal one.
    path = write_gguf(tmp_path / "dup.gguf", "qwen2", duplicate="<tool_call>")
    tokens, _ = declared(path)
    with pytest.raises(SystemExit) as failed:
        run({"path": str(path)}, tmp_path / "out")
    message = str(failed.value.code)
    assert "\n" not in message
    assert f"added token '<tool_call>' (id {tokens.index('<tool_call>')}) maps to id {len(tokens) - 1}" in message
    assert "dup.gguf" in message and "original Hugging Face folder" in message


def gguf_recipe(write, gguf_name: str) -> Path:
    write("calib.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]}) + "\n")
    return write("r.yaml", f"""
        name: tiny-gguf
        model:
          name: Tiny
          source: {{kind: gguf, path: {gguf_name}}}
        calibration:
          source: {{kind: jsonl, path: calib.jsonl}}
          samples: 1
        quantization:
          strategies:
            - {{name: max, preset: NVFP4_DEFAULT_CFG}}
        """)


def test_the_source_step_records_the_repairs_and_the_card_names_the_gguf_quantization(tmp_path, write):
    from runner.recipe.loader import load_recipe
    from runner.steps.report import source_description

    write_gguf(tmp_path / "tiny.Q8_0.gguf", "qwen2", quantized=True)
    path = gguf_recipe(write, "tiny.Q8_0.gguf")
    run_dir = tmp_path / "run"
    result = recipe("run", str(path), "--until", "source", "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = record(run_dir, "source")["summary"]
    assert any("'<tool_call>'" in line for line in summary["tokenizer"]["repairs"])
    assert "summary.tokenizer.repairs" in (run_dir / "logs" / "source.log").read_text()
    assert summary["gguf_weight_types"]["Q8_0"] == 9
    card = source_description(load_recipe(path).recipe, summary)
    assert "tiny.Q8_0.gguf" in card and "already quantized (Q8_0)" in card
    n = len(summary["tokenizer"]["repairs"])
    assert f"was repaired to match it ({n} changes: " in card and "'<tool_call>'" in card
    assert "|" not in card.replace("\\|", "")  # the card's table cell stays one cell


def test_an_unrepairable_tokenizer_fails_the_source_step_with_one_line(tmp_path, write):
    write_gguf(tmp_path / "dup.gguf", "qwen2", duplicate="<tool_call>")
    path = gguf_recipe(write, "dup.gguf")
    result = recipe("run", str(path), "--until", "source", "--run-dir", str(tmp_path / "run"), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "added token '<tool_call>' (id 263) maps to id 270" in output
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "steps" / "source").exists()
