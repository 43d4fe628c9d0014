"""The format registry (runner/quantization/formats.py): consistent in itself, complete against the
installed ModelOpt, and matched one to one by the worker's decoders and activation emulations."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from runner.quantization import formats

# Formats with no decoder here (verify reports their layers as not checked, the local engine refuses
# them): INT8 weights, which no shipped recipe exports.
UNDECODED = {"int8_sq", "int8_wo"}


def test_registry_is_consistent():
    names = [f.name for f in formats.FORMATS]
    algos = [f.quant_algo for f in formats.FORMATS]
    assert len(set(names)) == len(names) and len(set(algos)) == len(algos)
    assert all(a == a.upper() for a in algos)
    assert {f.name for f in formats.FORMATS if f.stored_as is None} == UNDECODED
    for fmt in formats.FORMATS:
        assert formats.by_name(fmt.name) is fmt and formats.by_quant_algo(fmt.quant_algo.lower()) is fmt
        if fmt.stored_as is not None:
            layout = formats.by_name(fmt.stored_as)
            assert layout is not None and layout.stored_as == layout.name, fmt.name
            # A format is read by its layout's decoder: same weight dtype, same packing.
            assert (layout.tensors.weight_dtype, layout.packing) == (fmt.tensors.weight_dtype, fmt.packing), fmt.name
        # The decode tolerance belongs to the layout that is decoded.
        assert (fmt.max_relative_error is not None) == (fmt.stored_as == fmt.name), fmt.name
        assert "weight_scale" in fmt.tensors.required, fmt.name
        assert not set(fmt.tensors.required) & set(fmt.tensors.optional), fmt.name
        assert fmt.packed == (fmt.code_bits == 4), fmt.name
        assert fmt.block >= 1 and (fmt.scale_bits == 0) == (fmt.block == 1), fmt.name
        if fmt.card is not None:
            assert fmt.card.tags and all(t == t.lower() for t in fmt.card.tags), fmt.name
            assert fmt.word is not None, fmt.name
    assert formats.MIXED_PRECISION not in algos
    assert not formats.NOT_SUPPORTED & set(names)


def test_registry_is_torch_free_and_imports_no_recipe_or_benchmark():
    code = ("import sys, runner.quantization.formats, runner.quantization.bits; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('runner.recipe', 'runner.benchmark'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_card_tables_derive_from_the_registry():
    from runner.quantization import export_words as report

    assert set(report.EXPORT_FORMATS) == {f.quant_algo for f in formats.FORMATS if f.card}
    assert report.export_format("w4a16_nvfp4", None)["name"] == "NVFP4-W4A16"
    assert {"nvfp4", "awq", "fp4"} <= report.FORMAT_TAGS
    assert report.repo_name_mismatch("me/Qwen3-8B-FP8-Dynamic", "NVFP4") == "me/Qwen3-8B-NVFP4"


def test_every_layout_has_a_decoder_and_every_activation_an_emulation():
    pytest.importorskip("torch")
    from runner.worker import quantized_linear, weight_formats

    assert set(weight_formats.DECODERS) == set(formats.layouts())
    assert set(quantized_linear.EMULATIONS) == set(formats.activations())
    with pytest.raises(RuntimeError, match=r"none for \['new_layout'\]"):
        formats.check_registered("weight decoders", [*formats.layouts(), "new_layout"], weight_formats.DECODERS)
    # What the local engine emulates follows the registry, by the layout the tensors tell.
    quant = quantized_linear.activation_quant
    assert quant("nvfp4", True, 0.5).kind == "nvfp4" and quant("nvfp4", False, None) is None  # W4A16: none
    assert quant("w4a8_awq", True, 0.5).kind == "fp8" and quant("fp8_pc_pt", False, None).kind == "fp8_per_token"
    assert quant("mxfp8", False, None) is None and quant("int4_awq", False, None) is None


def _modelopt_layer_formats() -> set[str]:
    pytest.importorskip("modelopt")
    from modelopt.torch.export import model_config

    return {value for name, value in vars(model_config).items()
            if name.startswith("QUANTIZATION_") and isinstance(value, str)}


def test_every_format_the_installed_modelopt_exports_has_an_entry():
    exported = _modelopt_layer_formats()
    assert exported, "no QUANTIZATION_* names in modelopt.torch.export.model_config"
    missing = sorted(exported - set(formats.names()) - formats.NOT_SUPPORTED)
    assert not missing, (f"ModelOpt exports {missing}, which runner/quantization/formats.py has no entry for: add "
                         "one (and its decoder in runner/worker/weight_formats.py), or list it in NOT_SUPPORTED "
                         "with the reason")
    assert exported >= formats.NOT_SUPPORTED, "NOT_SUPPORTED names a format ModelOpt no longer has"


def test_each_quant_algo_is_what_modelopts_exporter_writes():
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    assert set(formats.names()) <= _modelopt_layer_formats()
    for fmt in formats.FORMATS:
        written = process_layer_quant_config({"m.quantization": fmt.name, "m.awq_block_size": fmt.block})
        assert str(written["quant_algo"]).upper() == fmt.quant_algo, fmt.name


def test_verify_reads_each_mixed_layers_tensors_from_the_registry():
    from runner.serving import engine_for
    from runner.worker.verify import Report, check_mixed_layers

    meta = {"a.weight": ("U8", (8, 8)), "a.weight_scale": ("F8_E4M3", (8, 1)), "a.weight_scale_2": ("F32", ()),
            "b.weight": ("F8_E4M3", (8, 16)), "b.weight_scale": ("F32", ()),
            "c.weight": ("U8", (4, 16))}
    weights = {k.removesuffix(".weight"): v for k, v in meta.items() if k.endswith(".weight")}
    per_layer = {"a": {"quant_algo": "W4A16_NVFP4"}, "b": {"quant_algo": "FP8"}, "c": {"quant_algo": "W4A16_AWQ"}}
    report = Report()
    check_mixed_layers(report, per_layer, weights, meta, engine_for("local").verify_rules)
    (check,) = report.checks
    # The local engine needs no input_scale; c lacks the weight_scale its format stores.
    assert check["status"] == "fail" and check["detail"] == (
        "c: W4A16_AWQ needs a U8 weight and weight_scale; found U8, no weight_scale")
    check_mixed_layers(report, {**per_layer, "c": {"quant_algo": "W4A16_NVFP4"}}, weights,
                       {**meta, "c.weight_scale": ("F8_E4M3", (4, 2)), "c.weight_scale_2": ("F32", ())},
                       engine_for("local").verify_rules)
    assert report.checks[-1]["status"] == "pass", report.checks[-1]
