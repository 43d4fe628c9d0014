"""Export fix-ups: declarative JSON edits on a checkpoint folder, never through hard links."""

from __future__ import annotations

import json
import os

import pytest

from runner.errors import RunnerError
from runner.recipe.fixups import apply_fixups
from runner.steps.export import link_tree

QWEN35_FIXUPS = [
    {"op": "wrap_config", "file": "config.json", "under": "text_config",
     "keep_top": ["quantization_config", "torch_dtype"],
     "set": {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5"}},
    {"op": "write_json", "file": "preprocessor_config.json",
     "content": {"processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}},
    {"op": "set_json", "file": "tokenizer_config.json", "values": {"tokenizer_class": "Qwen2Tokenizer"}},
]


def make_export(root):
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "hidden_size": 128,
        "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}, "torch_dtype": "bfloat16"}))
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "x": 1}))
    (root / "model.safetensors").write_bytes(b"weights")
    return root


def test_qwen35_wrapping_as_declared_operations(tmp_path):
    source = make_export(tmp_path / "quantized")
    target = tmp_path / "fixed"
    link_tree(source, target)
    done = apply_fixups(target, QWEN35_FIXUPS, model_dir=None)
    assert len(done) == 3
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config["model_type"] == "qwen3_5"
    assert config["text_config"]["model_type"] == "qwen3_5_text"
    assert config["text_config"]["hidden_size"] == 128
    assert config["quantization_config"]["quant_algo"] == "NVFP4"  # kept on top, where vLLM reads it
    assert json.loads((target / "tokenizer_config.json").read_text()) == {"tokenizer_class": "Qwen2Tokenizer", "x": 1}
    assert json.loads((target / "preprocessor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    # The quantize step's committed output is untouched; unchanged weights are shared, not copied.
    assert json.loads((source / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    assert "Qwen2Tokenizer" not in (source / "tokenizer_config.json").read_text()
    assert os.stat(source / "model.safetensors").st_ino == os.stat(target / "model.safetensors").st_ino


def test_copy_file_from_the_source_model_and_from_a_path(tmp_path):
    ckpt = make_export(tmp_path / "ckpt")
    model = tmp_path / "model"
    model.mkdir()
    (model / "chat_template.jinja").write_text("{{ messages }}")
    extra = tmp_path / "extra.json"
    extra.write_text("{}")
    apply_fixups(ckpt, [{"op": "copy_file", "source": "model:chat_template.jinja", "to": "chat_template.jinja"},
                        {"op": "copy_file", "source": str(extra), "to": "extra.json"}], model_dir=model)
    assert (ckpt / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (ckpt / "extra.json").exists()


def test_fixup_errors_name_the_operation(tmp_path):
    ckpt = make_export(tmp_path / "ckpt")
    with pytest.raises(RunnerError, match=r"export.fixups\[0\] \(wrap_config\): nope.json is not in the exported"):
        apply_fixups(ckpt, [{"op": "wrap_config", "file": "nope.json", "under": "x", "keep_top": [], "set": {}}], None)
    with pytest.raises(RunnerError, match=r"export.fixups\[0\] \(copy_file\): source file .* does not exist"):
        apply_fixups(ckpt, [{"op": "copy_file", "source": "model:missing.txt", "to": "m"}], tmp_path)
