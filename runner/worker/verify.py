"""Worker: verify an exported checkpoint before anyone tries to serve it.

Checks, each reported as pass / warn / fail with its evidence:
- every safetensors file opens and its tensors have the dtypes NVFP4/FP8 exports use;
- hf_quant_config.json exists and has the keys vLLM requires for its quant_algo;
- the quant_algo is one the configured engine loads, and the engine's own rules (runner/quantization/
  verify_rules.py: the verify step passes them in its params);
- every exclusion pattern of the recipe matches real modules, every such module is covered by
  exclude_modules and stored unquantized, with no scale tensors (vllm#40252, vllm#45102);
- every exclude_modules entry matches a real module (else it is a silent no-op);
- each quantized layer's tensors follow a layout the decoders here know (runner/worker/weight_formats.py:
  NVFP4 at any block size, MXFP4, MXFP8, FP8 per tensor / channel / block, INT4 AWQ, W4A8); a layout
  they do not know is reported as not checked, by name, never as a crash;
- quantized layers' input sizes are multiples of their format's block;
- the independent decoders reproduce the weights: decoded vs. the source model, relative error;
- checkpoint size vs. the ideal (each format's bits per weight, the rest as stored);
- every tensor of the source checkpoint (its headers) is in the export, under its own name or the one a
  fix-up renames it to, carried by a `carry_tensors` fix-up, or dropped on purpose by a `drop_tensors`
  fix-up with its reason; an untied lm_head stays untied; carried tensors are unquantized, in their
  declared dtype, with no scales, and the engine is told to build them unquantized.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

from runner.quantization import formats
from runner.quantization.bits import DTYPE_BITS, bits_of
from runner.quantization.exclusions import names_module
from runner.quantization.safetensors_headers import read_headers
from runner.quantization.verify_rules import TensorAccounting, VerifyRules
from runner.quantization.weights import is_embedding
from runner.worker.weight_formats import Layout, decode, identify

SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
SAMPLED_LAYERS = 8


def run(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    checkpoint = Path(params["checkpoint"])
    report = verify_checkpoint(checkpoint, params.get("exclude", []), VerifyRules.from_params(params["rules"]),
                               Path(params["model_dir"]) if params.get("model_dir") else None,
                               smoothed=params.get("smoothed", False),
                               accounting=TensorAccounting.from_params(params.get("accounting")))
    (output_dir / "verify_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    for check in report["checks"]:
        print(f"[verify] {check['status']:>4}  {check['name']}: {check['detail']}", flush=True)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    if failed:
        raise SystemExit("verification failed: " + "; ".join(f"{c['name']}: {c['detail']}" for c in failed))
    return {"outputs": {"report": "verify_report.json"},
            "summary": {k: v for k, v in report.items() if k != "checks"} | {
                "checks": {c["name"]: c["status"] for c in report["checks"]},
                "details": {c["name"]: c["detail"] for c in report["checks"] if c["status"] != "pass"}}}


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, str]] = []

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        """ok: True pass, False fail, None warn."""
        status = "pass" if ok else ("warn" if ok is None else "fail")
        self.checks.append({"name": name, "status": status, "detail": detail})


def read_tensors_meta(checkpoint: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, Path]]:
    from safetensors import safe_open

    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    where: dict[str, Path] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = fh.get_slice(key)
                meta[key] = (str(sl.get_dtype()), tuple(sl.get_shape()))
                where[key] = file
    return meta, where


def load_tensor(where: dict[str, Path], key: str) -> Any:
    from safetensors import safe_open

    with safe_open(where[key], framework="pt") as fh:
        return fh.get_tensor(key)


def verify_checkpoint(checkpoint: Path, exclude: list[str], rules: VerifyRules, model_dir: Path | None,
                      smoothed: bool = False, accounting: TensorAccounting | None = None) -> dict[str, Any]:
    """`rules`: what the serving engine needs of the export. `smoothed`: AWQ scales were folded into the
    weights, so they differ from the source by per-channel factors. `accounting`: what the recipe's fix-ups
    declare about the source's tensors (renamed, carried, dropped)."""
    report = Report()
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        report.add("safetensors", False, f"no *.safetensors file in {checkpoint.name}")
        return {"checks": report.checks}
    try:
        meta, where = read_tensors_meta(checkpoint)
        report.add("safetensors", bool(files), f"{len(files)} file(s), {len(meta)} tensors readable")
    except Exception as exc:  # noqa: BLE001 - any read error is the finding
        report.add("safetensors", False, f"cannot read: {exc}")
        return {"checks": report.checks}

    quant_config_path = checkpoint / "hf_quant_config.json"
    quant: dict[str, Any] = {}
    if quant_config_path.is_file():
        quant = json.loads(quant_config_path.read_text(encoding="utf-8")).get("quantization", {})
    algo = str(quant.get("quant_algo") or "").upper() or None  # vLLM compares case-insensitively
    if quant_config_path.is_file():
        fmt = formats.by_quant_algo(algo)
        needed = (formats.MIXED_CONFIG_KEYS if algo == formats.MIXED_PRECISION else
                  fmt.config_keys if fmt else formats.PLAIN_CONFIG_KEYS)
        missing = [k for k in needed if k not in quant]
        report.add("hf_quant_config", not missing,
                   f"quant_algo {algo}" + (f"; missing keys {', '.join(missing)}" if missing else ", keys vLLM needs"))
    else:
        report.add("hf_quant_config", False, "hf_quant_config.json is missing")
    accepted = rules.quant_algos
    report.add("quant_algo_supported", algo in accepted,
               f"{algo} is {'' if algo in accepted else 'NOT '}loadable by the {rules.engine} engine"
               + ("" if algo in accepted else f" (it accepts {', '.join(accepted)})"))
    smoothing = sorted(k for k in meta if k.endswith(".pre_quant_scale"))
    if rules.no_pre_quant_scale:
        report.add("pre_quant_scale", not smoothing,
                   "no pre_quant_scale tensors" if not smoothing else
                   f"{len(smoothing)} pre_quant_scale tensors (e.g. {smoothing[0]}): vLLM's ModelOpt loader has no "
                   "place for them; keep the strategy's fold_awq_scales: true")

    weights = {k.removesuffix(".weight"): v for k, v in meta.items() if k.endswith(".weight")}
    layouts = {m: found for m in weights if (found := identify(m, meta)) is not None}
    quantized = {m: weights[m] for m in layouts}
    known = {m: layout for m, layout in layouts.items() if isinstance(layout, Layout)}
    unknown = {m: what for m, what in layouts.items() if isinstance(what, str)}
    counts: dict[str, int] = {}
    for layout in known.values():
        counts[layout.name] = counts.get(layout.name, 0) + 1
    report.add("formats", None if unknown else True,
               (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no quantized layer")
               + ("; not checked (a layout the decoders here do not know): "
                  + "; ".join(f"{m}: {w}" for m, w in list(unknown.items())[:3]) if unknown else ""))
    excluded_entries = list(quant.get("exclude_modules") or [])
    per_layer = quant.get("quantized_layers") if algo == formats.MIXED_PRECISION else None

    def covered(module: str) -> bool:
        if isinstance(per_layer, dict):  # mixed precision lists what IS quantized
            return module not in per_layer
        return any(fnmatch.fnmatchcase(module, e) or module == e or module.startswith(e + ".")
                   for e in excluded_entries)

    if isinstance(per_layer, dict):
        check_mixed_layers(report, per_layer, weights, meta, rules)

    # Recipe exclusions: match real modules, listed in exclude_modules, stored unquantized, no scales.
    problems = []
    notes = []
    for pattern in exclude:
        hits = [m for m in weights if names_module(pattern, m)]
        if not hits:
            notes.append(f"{pattern} matches no tensor")
            continue
        for module in hits:
            scales = [s for s in SCALE_SUFFIXES if f"{module}.{s}" in meta]
            if module in quantized or scales:
                problems.append(f"{module} (excluded by {pattern}) is stored quantized or has {', '.join(scales)}")
            elif needs_listing(module, weights[module]) and not covered(module):
                problems.append(f"{module} (excluded by {pattern}) is missing from exclude_modules")
    report.add("exclusions", not problems,
               "; ".join(problems[:5]) if problems else
               f"{len(exclude)} pattern(s) honoured" + (f" ({'; '.join(notes)})" if notes else ""))
    if notes and not problems:
        report.add("exclusion_patterns_match", None, "; ".join(notes) + ": a typo, or a module the model lacks")

    dangling = [e for e in excluded_entries
                if not any(fnmatch.fnmatchcase(m, e) or m == e or m.startswith(e + ".") for m in weights)]
    report.add("exclude_modules_match", None if dangling else True,
               f"{len(excluded_entries)} entries" + (f"; match no tensor: {', '.join(dangling)} (harmless when "
                                                     "the module is tied or absent)" if dangling else ""))

    if rules.vllm_module_rules:
        mangled = [repr(e) for e in excluded_entries if not isinstance(e, str) or any(ord(c) < 32 for c in e)]
        report.add("exclude_modules_names", not mangled,
                   "every entry is a plain module name" if not mangled else
                   f"entries vLLM cannot match: {', '.join(mangled[:3])}")
        split = split_fused_groups(weights, layouts)
        report.add("fused_groups", not split,
                   "projections vLLM fuses (q/k/v, gate/up, DeltaNet qkv/z and b/a) share one format each"
                   if not split else "vLLM fuses these but they differ in format (it refuses to load): "
                   + "; ".join(split[:3]) + " (an exclusion pattern splits a fused group)")

    if model_dir is not None and any(Path(model_dir).glob("*.safetensors")):
        source = {t.name: t.dtype for t in read_headers(Path(model_dir)).values()}
        account_tensors(report, source, meta, accounting or TensorAccounting(), covered)
        check_lm_head(report, source, meta, checkpoint)

    bad_sizes = [f"{m} in_features {layout.in_features} (blocks of {layout.block})" for m, layout in known.items()
                 if layout.block and layout.family != "fp8_pb_wo" and layout.in_features % layout.block]
    report.add("input_sizes", not bad_sizes,
               f"{len(known)} quantized layers" + (f"; not multiples of their block: {', '.join(bad_sizes[:5])}"
                                                   if bad_sizes else ", input sizes fit their blocks"))

    # AWQ and SVDQuant scale input channels and fold the inverse elsewhere.
    awq = smoothed or bool(smoothing)
    errors, limits = decode_against_source(known, where, model_dir, awq)
    if errors is None:
        report.add("weights_decode", None, "no quantized layer of a known layout, or no source model to compare with")
    else:
        over = {m: e for m, e in errors.items() if e > limits[m]}
        worst = max(errors.values()) if errors else 0.0
        per_format = ", ".join(sorted({f"{known[m].family} {limits[m]}" for m in errors}))
        beyond = ", ".join(f"{m} {e:.3f}" for m, e in list(over.items())[:3])
        report.add("weights_decode", not over,
                   f"independent decoders vs source weights over {len(errors)} layers"
                   + (" (after fitting the per-channel scales AWQ folds in)" if awq else "")
                   + f": relative RMS error max {worst:.4f}"
                   + (f"; over their format's limit: {beyond}" if over
                      else f", within each format's limit ({per_format})"))

    actual = sum(f.stat().st_size for f in files)
    ideal = ideal_size_bytes(meta, known)
    report.add("size", None if ideal and actual > 1.1 * ideal else True,
               f"{actual / 1e6:.1f} MB on disk vs ideal {ideal / 1e6:.1f} MB ({(actual / ideal - 1) * 100:+.1f} %)")
    return {"checks": report.checks, "quant_algo": algo, "quantized_layers": len(quantized),
            "tensors": len(meta), "size_bytes": actual, "ideal_bytes": ideal,
            "size_overhead_pct": round((actual / ideal - 1) * 100, 2) if ideal else None,
            "decode_errors": errors}


# Per-expert tensors an export writes for a source's fused expert tensors (or the other way round).
_EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def canonical(name: str) -> str:
    """A tensor name with the spellings exports and sources differ by made equal: the `language_model.`
    level vision-language layouts add or drop, and routed experts stored one by one or fused."""
    name = name.replace("language_model.", "")
    found = _EXPERT.search(name)
    if found:
        fused = ".experts.down_proj" if found.group(1) == "down_proj" else ".experts.gate_up_proj"
        name = name[:found.start()] + fused
    return name


def _listed(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def account_tensors(report: Report, source: dict[str, str], meta: dict[str, tuple[str, tuple[int, ...]]],
                    accounting: TensorAccounting, covered: Any) -> None:
    """Every source tensor exported, renamed, carried or dropped on purpose; carried ones unquantized."""
    exported = {canonical(n) for n in meta}
    renamed = dict(accounting.renamed)
    missing: list[str] = []
    dropped: dict[str, int] = {}
    for name in source:
        if canonical(renamed.get(name, name)) in exported:
            continue
        reason = next((why for pattern, why in accounting.dropped if fnmatch.fnmatchcase(name, pattern)), None)
        if reason is None:
            missing.append(name)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    carried = {name: dtype for name in source for pattern, dtype in accounting.carried
               if fnmatch.fnmatchcase(name, pattern)}
    if missing:
        hint = ("; lm_head.weight: the quantize worker's model tied the head to the embeddings (the source's "
                "config.json omits tie_word_embeddings or says true while the checkpoint has its own head): set "
                "tie_word_embeddings: false in the source config" if any(n.endswith("lm_head.weight")
                                                                          for n in missing) else "")
        report.add("tensor_accounting", False,
                   f"{len(missing)} of the source's {len(source)} tensors are not in the export: {_listed(missing)}; "
                   "carry them (export.fixups `op: carry_tensors`, `match:`) or declare them left out on purpose "
                   f"(export.fixups `op: drop_tensors`, `match:`, `reason:`){hint}")
    else:
        report.add("tensor_accounting", True,
                   f"all {len(source)} source tensors accounted for: {len(source) - sum(dropped.values())} in the "
                   f"export" + (f" ({len(carried)} carried by a fix-up)" if carried else "")
                   + "".join(f"; {n} left out on purpose ({why})" for why, n in dropped.items()))
    if not carried:
        return
    wrong = []
    for name, dtype in carried.items():
        stored = meta.get(name)
        module = name.removesuffix(".weight")
        scales = [s for s in SCALE_SUFFIXES if f"{module}.{s}" in meta]
        want = {"bfloat16": "BF16"}.get(dtype, dtype)
        if stored is None:
            wrong.append(f"{name} missing")
        elif stored[0] != want or scales:
            wrong.append(f"{name} stored {stored[0]}" + (f" with {', '.join(scales)}" if scales else ""))
        elif name.endswith(".weight") and needs_listing(module, stored) and not covered(module):
            wrong.append(f"{module} not in exclude_modules (the engine would build it quantized)")
    report.add("carried_tensors", not wrong,
               f"{len(carried)} carried tensor(s) ({', '.join(sorted({p for p, _ in accounting.carried}))}) stored "
               "unquantized, without scales, excluded from quantization" if not wrong else
               f"carried tensors not as declared: {_listed(wrong)}")


def check_lm_head(report: Report, source: dict[str, str], meta: dict[str, Any], checkpoint: Path) -> None:
    """A source with its own lm_head.weight (untied) keeps it, and the export's config does not tie it again."""
    heads = [n for n in source if canonical(n).endswith("lm_head.weight")]
    if not heads:
        return
    kept = {canonical(n) for n in meta} >= {canonical(n) for n in heads}
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tied = [where for where, section in (("config.json", config), ("text_config", config.get("text_config")))
            if isinstance(section, dict) and section.get("tie_word_embeddings") is True]
    report.add("lm_head", kept and not tied,
               "the source's own lm_head.weight is in the export, untied" if kept and not tied else
               f"the source has its own {heads[0]} (untied) but "
               + ("the export has none: the model was loaded with the head tied to the embeddings"
                  if not kept else f"{' and '.join(tied)} says tie_word_embeddings: true, so vLLM would tie it again")
               + "; set tie_word_embeddings: false in the model's config.json")


def needs_listing(module: str, weight: tuple[str, tuple[int, ...]]) -> bool:
    """An unquantized module vLLM would build quantized unless exclude_modules names it: a Linear
    (2-D weight). Norms (1-D) and embeddings never take vLLM's ModelOpt quant method."""
    dtype, shape = weight
    return dtype not in ("U8", "F8_E4M3") and len(shape) == 2 and not is_embedding(module)


# Projections vLLM loads as one fused layer: all shards must have one format (its quant_utils refuses
# "some but not all shards" quantized).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"),
                ("in_proj_b", "in_proj_a"))


def split_fused_groups(weights: dict[str, Any], layouts: dict[str, Any]) -> list[str]:
    """Fused groups whose members are stored in different formats, one line each."""
    def fmt(module: str) -> str:
        layout = layouts.get(module)
        return layout.name if isinstance(layout, Layout) else "quantized" if layout is not None else "unquantized"

    found = []
    for module in weights:
        parent, _, leaf = module.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf != group[0]:
                continue
            members = {m: fmt(m) for m in (f"{parent}.{g}" for g in group) if m in weights}
            if len(set(members.values())) > 1:
                found.append(", ".join(f"{m.rsplit('.', 1)[-1]} {f}" for m, f in members.items()) + f" in {parent}")
    return found


def check_mixed_layers(report: Report, per_layer: dict[str, Any], weights: dict[str, Any],
                       meta: dict[str, Any], rules: VerifyRules) -> None:
    """MIXED_PRECISION: each listed layer holds its format's tensors, and every other Linear is unquantized."""
    problems = []
    algo_counts: dict[str, int] = {}
    covered: set[str] = set()
    for listed, config in per_layer.items():
        layer_algo = str((config or {}).get("quant_algo") or "").upper()
        algo_counts[layer_algo] = algo_counts.get(layer_algo, 0) + 1
        expected = formats.by_quant_algo(layer_algo)
        if rules.layer_algos and layer_algo not in rules.quant_algos:
            problems.append(f"{listed}: {layer_algo} is not loadable by vLLM")
        # A MoE layer's experts are listed once, as the fused module vLLM builds (`mlp.experts`: its
        # FusedMoE prefix, which vLLM's mixed-precision config looks up directly), and stored per expert.
        members = [listed] if listed in weights else [m for m in weights if m.startswith(listed + ".")]
        if not members:
            problems.append(f"{listed}: listed in quantized_layers but has no weight tensor")
        covered.update(members)
        for layer in members if expected is not None else []:
            dtype, scales = expected.tensors.weight_dtype, expected.tensors.required
            # Activation scales matter to an engine that quantizes activations (vLLM); the local engine
            # serves weights dequantized.
            scales = tuple(s for s in scales if s != "input_scale" or rules.input_scales)
            lacking = [s for s in scales if f"{layer}.{s}" not in meta]
            if weights[layer][0] != dtype or lacking:
                problems.append(f"{layer}: {layer_algo} needs a {dtype} weight and {', '.join(scales)}; found "
                                f"{weights[layer][0]}" + (f", no {', '.join(lacking)}" if lacking else ""))
    stray = [m for m, (dtype, _) in weights.items() if m not in covered
             and (dtype in ("U8", "F8_E4M3") or f"{m}.weight_scale" in meta)]
    problems += [f"{m}: stored quantized but not listed in quantized_layers" for m in stray]
    report.add("mixed_layers", not problems,
               "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "") if problems
               else f"{len(per_layer)} listed layers ({', '.join(f'{n} {k}' for k, n in sorted(algo_counts.items()))}) "
                    "hold their format's tensors; every other Linear is unquantized")


def ideal_size_bytes(meta: dict[str, tuple[str, tuple[int, ...]]], known: dict[str, Layout]) -> int:
    """Each quantized weight at its format's bits (runner/quantization/bits.py), every other tensor as
    stored; scales excluded."""
    import math

    total = 0.0
    scale_keys = {f"{m}.{s}" for m in known for s in SCALE_SUFFIXES}
    for key, (dtype, shape) in meta.items():
        if key in scale_keys:
            continue
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in known:
            layout = known[module]
            total += layout.out_features * layout.in_features * bits_of(layout.name) / 8
        else:
            total += math.prod(shape) * DTYPE_BITS.get(dtype, 16) / 8
    return int(total)


def decode_against_source(known: dict[str, Layout], where: dict[str, Path], model_dir: Path | None,
                          awq: bool = False) -> tuple[dict[str, float] | None, dict[str, float]]:
    """Relative RMS error of each sampled layer's decoded weight against the source weight, and the
    limit of its format."""
    import torch

    modules = sorted(known)
    if not modules or model_dir is None:
        return None, {}
    source_meta, source_where = read_tensors_meta(model_dir)
    # Sample across formats: every format present gets layers of its own.
    by_family: dict[str, list[str]] = {}
    for module in modules:
        by_family.setdefault(known[module].family, []).append(module)
    sampled = []
    for members in by_family.values():
        step = max(1, len(members) // SAMPLED_LAYERS)
        sampled += members[::step][:SAMPLED_LAYERS]
    errors, limits = {}, {}
    for module in sampled:
        source_key = _source_key(module, source_meta)
        if source_key is None:
            continue
        layout = known[module]
        names = [s for s in ("weight", "weight_scale", "weight_scale_2") if f"{module}.{s}" in where]
        decoded = decode(layout, {s: load_tensor(where, f"{module}.{s}") for s in names})
        lora_a, lora_b = (f"{module}.weight_quantizer._svdquant_lora_{x}" for x in "ab")
        if lora_a in where and lora_b in where:
            # SVDQuant keeps a low-rank part in high precision: W ~ decode(codes) + B @ A.
            decoded = decoded + load_tensor(where, lora_b).float() @ load_tensor(where, lora_a).float()
        original = load_tensor(source_where, source_key).float()
        limits[module] = _max_relative_error(layout)
        if original.shape != decoded.shape:
            errors[module] = float("inf")
            continue
        if awq:
            original = fit_channel_scales(original, decoded)
        errors[module] = round(float(torch.linalg.norm(decoded - original) / torch.linalg.norm(original)), 5)
    return errors, limits


def _max_relative_error(layout: Layout) -> float:
    """The decode tolerance of a layout's format (runner/quantization/formats.py)."""
    fmt = formats.by_name(layout.family)
    if fmt is None or fmt.max_relative_error is None:
        raise ValueError(f"{layout.family} is no stored layout of runner/quantization/formats.py")
    return fmt.max_relative_error


def fit_channel_scales(original: Any, decoded: Any, rounds: int = 4) -> Any:
    """diag(r) @ original @ diag(c) fitted to `decoded` by alternating least squares.

    AWQ multiplies each weight's input channels by a scale and folds the inverse into the layer
    before (a norm, or the rows of up_proj / v_proj), so an AWQ export holds r_i * W_ij * c_j, not W.
    Per-channel scales cannot hide a decoding error inside a block (wrong nibble order, misplaced
    block scales), so the remaining error still tells a faithful decode from a broken one.
    """
    import torch

    rows = torch.ones(original.shape[0], 1)
    cols = torch.ones(1, original.shape[1])
    for _ in range(rounds):
        scaled = original * cols
        rows = (decoded * scaled).sum(1, keepdim=True) / (scaled * scaled).sum(1, keepdim=True).clamp_min(1e-30)
        scaled = rows * original
        cols = (decoded * scaled).sum(0, keepdim=True) / (scaled * scaled).sum(0, keepdim=True).clamp_min(1e-30)
    return rows * original * cols


def _source_key(module: str, source_meta: dict[str, Any]) -> str | None:
    """The source model's tensor for an exported module (exports may add a `language_model.` level)."""
    for candidate in (module, module.replace("model.language_model.", "model."),
                      module.replace("language_model.", "")):
        if f"{candidate}.weight" in source_meta:
            return f"{candidate}.weight"
    return None
