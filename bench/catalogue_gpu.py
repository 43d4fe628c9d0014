"""A catalogue recipe's strategy at the model's real size on one GPU: prediction vs. what ModelOpt does.

Builds the model a shipped recipe names at full size from its `model.shapes` config (random bf16
weights, on the GPU, nothing downloaded), quantizes it with the recipe's own strategy and exclusions
through the quantize worker's code (random-token calibration), exports it, applies the recipe's
fix-ups that need no source file, and runs verify for the vllm engine. Prints the prediction `recipe
list` makes (size, effective bits) next to the export's, the routed experts' format, the verify
verdict, and the times and peak GPU memory.

    python bench/catalogue_gpu.py recipes/qwen3-30b-a3b.yaml [--strategy w4a16] [--samples 16]
        [--tokens 512] [--work DIR] [--layers K]

`--layers K` keeps the first K decoder layers at full width (config and tensor listing cut alike, so
the prediction is for the same truncated model): for models whose BF16 weights exceed one GPU. Every
layer of a kind has the same shapes, so the per-layer sizes, formats and verify verdict are the full
model's; totals are the truncated model's.

Needs CUDA, torch, transformers, ModelOpt, and disk for one export (the quantized size).
The weights are random: sizes, formats, placement and times are real; quality numbers are not.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--strategy", default="w4a16")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=None, help="keep the first K decoder layers (full width)")
    ap.add_argument("--mtp-source", action="store_true",
                    help="save the random model as the source with an MTP head (mtp.* shaped as Qwen's checkpoints "
                         "store it), apply every fix-up (carry_tensors included) and verify against that source")
    ap.add_argument("--device", default="cuda", help="cpu: a quick check of the script on a small model")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig

    from runner.benchmark.prediction import hardware_target
    from runner.catalogue import LIST_HARDWARE
    from runner.quantization import footprint
    from runner.quantization.weights import load_weights
    from runner.recipe.fixups import CarryTensors, CopyFile, apply_fixups, tensor_accounting
    from runner.recipe.loader import load_recipe
    from runner.serving.vllm import VllmEngine
    from runner.worker.calib_data import CalibrationSet
    from runner.worker.model_loading import model_class, with_architectures
    from runner.worker.quantize import (
        effective_bits,
        fold_scales,
        full_logits_kwargs,
        layer_formats,
        quantize_model,
        repair_exclude_modules,
    )
    from runner.worker.verify import verify_checkpoint

    recipe = load_recipe(args.recipe, env={}).recipe
    strategy = next(s for s in recipe.quantization.strategies if s.name == args.strategy)
    exclude = recipe.quantization.exclusions(strategy)
    shapes = recipe.model.shapes
    work = args.work or Path(tempfile.mkdtemp(prefix="catalogue-gpu-"))
    if args.layers is not None:
        shapes = truncated_shapes(shapes, args.layers, work / "shapes")
    weights = load_weights(shapes)
    # The random source holds the text model and, with --mtp-source, an MTP head: the prediction counts what
    # the recipe's carry_tensors fix-ups would carry from it (the MTP head), not a vision tower it lacks.
    carried = [c for c in footprint.carry_patterns(recipe) if c[0].startswith("mtp")] if args.mtp_source else []
    predicted = footprint.strategy_footprint(weights, strategy, exclude, hardware_target(LIST_HARDWARE),
                                             recipe.model.dtype, carried=carried)
    print(f"{recipe.name} / {strategy.name}: predicted {predicted.checkpoint_bytes / 1e9:.2f} GB, "
          f"{predicted.effective_bits:.3f} effective bits, {predicted.decode_tok_s} tok/s on {LIST_HARDWARE}",
          flush=True)

    device = torch.device(args.device)
    t0 = time.monotonic()
    config = AutoConfig.from_pretrained(shapes)
    config.architectures = config.architectures or [recipe.model.architecture]
    torch.manual_seed(0)
    with torch.device(device):
        model = with_architectures(model_class(config).from_config(config, dtype=torch.bfloat16).eval(),
                                   recipe.model.architecture)
    params = sum(p.numel() for p in model.parameters())
    build_s = time.monotonic() - t0
    print(f"built {type(model).__name__}: {params / 1e9:.2f} B parameters in {build_s:.1f}s", flush=True)
    source = None
    if args.mtp_source:
        source = work / "source"
        t_src = time.monotonic()
        carried = save_source_with_mtp(model, config, source)
        print(f"source saved with {carried} mtp.* tensors in {time.monotonic() - t_src:.1f}s", flush=True)

    vocab = config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, vocab, (args.tokens,), generator=gen).tolist() for _ in range(args.samples)]
    calib = CalibrationSet(token_ids=ids, pad_id=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = quantize_model(model, calib, strategy, exclude, device)
    # As the quantize worker does: AWQ's per-channel scales folded so the export is plain NVFP4.
    fold = fold_scales(model, calib, device, full_logits_kwargs(model), norms_only=not strategy.fold_awq_scales)
    if fold is not None:
        print(f"AWQ scales folded ({fold['mode']}) in {fold['fold_s']:.1f}s", flush=True)
    layers = layer_formats(model)
    bits = effective_bits(model, layers)
    formats: dict[str, int] = {}
    for fmt in layers.values():
        formats[fmt] = formats.get(fmt, 0) + 1
    experts = {fmt for name, fmt in layers.items() if re.search(r"\.experts\.(gate_up_proj|up_proj|down_proj)$", name)}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    print(f"quantized in {result['quantize_s']:.1f}s ({result['batches']} batches), peak GPU {peak:.1f} GiB; "
          f"formats {formats}; routed experts {sorted(experts)}", flush=True)

    checkpoint = work / "checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    from modelopt.torch.export import export_hf_checkpoint

    t1 = time.monotonic()
    export_hf_checkpoint(model, export_dir=checkpoint)
    export_s = time.monotonic() - t1
    repaired = repair_exclude_modules(checkpoint)
    fixups = recipe.export.fixups
    if source is None:  # no source folder: the fix-ups that read one are left out
        fixups = [f for f in fixups if not (isinstance(f, CopyFile) and f.model_file is not None
                                            or isinstance(f, CarryTensors))]
    done = apply_fixups(checkpoint, fixups, source)
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"exported in {export_s:.1f}s: {size / 1e9:.2f} GB of safetensors (predicted "
          f"{predicted.checkpoint_bytes / 1e9:.2f}, {(size / predicted.checkpoint_bytes - 1) * 100:+.1f} %); "
          f"effective bits {bits:.3f} (predicted {predicted.effective_bits:.3f}); exclude_modules repaired "
          f"{len(repaired)}; fix-ups: {done}", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    t2 = time.monotonic()
    report = verify_checkpoint(checkpoint, exclude, VllmEngine().verify_rules, source,
                               smoothed=fold is not None, accounting=tensor_accounting(fixups))
    checks = {c["name"]: c["status"] for c in report["checks"]}
    notes = {c["name"]: c["detail"][:200] for c in report["checks"] if c["status"] != "pass"}
    print(f"verify in {time.monotonic() - t2:.1f}s: quant_algo {report.get('quant_algo')}, "
          f"{report.get('quantized_layers')} quantized layers; {json.dumps(checks)}", flush=True)
    for name, detail in notes.items():
        print(f"  {name}: {detail}", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def save_source_with_mtp(model, config, source: Path) -> int:
    """The random model saved as a source checkpoint, plus an MTP head as Qwen's checkpoints store it: one
    full-attention decoder layer under mtp.layers.0 (a copy of the model's last full-attention layer),
    mtp.fc [h, 2h] and three norms; `mtp_num_hidden_layers: 1` in its config."""
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(source, ignore_errors=True)
    kept = copy.deepcopy(model.config)  # save_pretrained leaves dtype a string in the config, which export reads
    model.save_pretrained(source)
    model.config = kept
    text = config.get_text_config()
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    last = max(i for i, kind in enumerate(kinds) if kind == "full_attention")
    state = model.state_dict()
    prefix = next(k[: k.index(f"layers.{last}.")] for k in state if f"layers.{last}." in k)
    layer = f"{prefix}layers.{last}."
    hidden = text.hidden_size
    mtp = {"mtp.layers.0." + k[len(layer):]: v.detach().to("cpu").clone()
           for k, v in state.items() if k.startswith(layer)}
    mtp["mtp.fc.weight"] = (torch.randn(hidden, 2 * hidden) * 0.02).to(torch.bfloat16)
    for norm in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        mtp[f"mtp.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(mtp, source / "model-mtp.safetensors", metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({name: "model-mtp.safetensors" for name in mtp})
        index.write_text(json.dumps(data, indent=2))
    saved = json.loads((source / "config.json").read_text())
    (saved.get("text_config") or saved)["mtp_num_hidden_layers"] = 1
    (source / "config.json").write_text(json.dumps(saved, indent=2))
    return len(mtp)


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# Per-layer config lists and strings (a layer's kind), cut with the layers.
_PER_LAYER_KEYS = ("layer_types", "hybrid_override_pattern", "mlp_only_layers")


def truncated_shapes(shapes: Path, layers: int, out: Path) -> Path:
    """A copy of a model folder's config.json and tensors.json with only the first `layers` decoder layers."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((shapes / "config.json").read_text())
    for section in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        if "num_hidden_layers" in section:
            section["num_hidden_layers"] = min(layers, section["num_hidden_layers"])
        for key in _PER_LAYER_KEYS:
            value = section.get(key)
            if key == "mlp_only_layers" and isinstance(value, list):
                section[key] = [i for i in value if i < layers]
            elif isinstance(value, (list, str)):
                section[key] = value[:layers]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    listing = json.loads((shapes / "tensors.json").read_text())
    listing["tensors"] = {name: spec for name, spec in listing["tensors"].items()
                          if (m := _LAYER_INDEX.search(name)) is None or int(m.group(1)) < layers}
    (out / "tensors.json").write_text(json.dumps(listing))
    return out


if __name__ == "__main__":
    main()
