"""What the flagship's search (recipes/base/search-spark.yaml) would do at the Qwen3.5-9B shape, without a GPU:
the candidates ModelOpt's PTQ order proposes under scripted gate outcomes, round by round, each with its
predicted bytes read per token on DGX Spark (from the shapes listing, runner/quantization/footprint.py).

    .venv/bin/python bench/search_procedure_9b.py [recipes/qwen35-9b-opus.yaml]

Scenarios (the gates' verdicts are scripted, the predictions are real):
  all-hold       every widening passes the gates
  attention-hard attention fails with every calibration; the sensitivity back-off (2 layers BF16) holds
  deltanet-never linear attention fails whatever is tried: it stays BF16, as Qwen3.5's base excludes it
It prints the number of rounds, quantize steps and served candidates each scenario costs (the budget caps
them), and where the search ends against the hand-written strategies.
"""

from __future__ import annotations

import sys
from pathlib import Path

from runner.benchmark.prediction import hardware_target
from runner.quantization import footprint
from runner.quantization.families import family_of
from runner.quantization.weights import load_weights
from runner.recipe.loader import load_recipe
from runner.search.driver import candidate_strategy
from runner.search.procedure import ACCEPTED, REJECTED, Candidate, Outcome, ptq_order

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "recipes" / "qwen35-9b-opus.yaml"
    recipe = load_recipe(path).recipe
    assert recipe.search is not None, f"{path} has no search"
    folder, read_from = footprint.model_folder(recipe)
    weights = load_weights(folder)
    hardware = hardware_target(recipe.benchmark.hardware)
    present = {f for m in weights.linears if (f := family_of(m))}
    print(f"{recipe.name}: shapes from {read_from}; families {sorted(present)}; target {recipe.benchmark.hardware}")

    def predict(strategy) -> footprint.Footprint:
        return footprint.strategy_footprint(weights, strategy, recipe.quantization.exclusions(strategy), hardware,
                                            recipe.model.dtype, footprint.carry_patterns(recipe))

    source = footprint.source_footprint(recipe, weights, hardware)
    print(f"  BF16 source: {source.bytes_per_token / 1e9:.2f} GB a token, {source.decode_tok_s} tok/s")
    for strategy in recipe.enabled_strategies():
        fp = predict(strategy)
        if fp.bytes_per_token:
            print(f"  hand-written {strategy.name}: {fp.bytes_per_token / 1e9:.2f} GB a token, {fp.decode_tok_s} tok/s")

    sensitivity = [{"layer": i, "kl_recovered": 0.01 * ((i * 7) % 11)} for i in range(32)]
    scenarios = {
        "all-hold": lambda c: ACCEPTED,
        "attention-hard": lambda c: ACCEPTED if "attention" not in dict(c.formats) or c.keep_layers else REJECTED,
        "deltanet-never": lambda c: REJECTED if "linear_attention" in dict(c.formats) else ACCEPTED,
    }
    for scenario, verdict in scenarios.items():
        procedure = ptq_order(recipe.search.space, present)
        rounds, quantized, last = 0, 0, None
        accepted: list[Candidate] = []
        print(f"\n{scenario}:")
        try:
            proposed = next(procedure)
            while True:
                rounds += 1
                outcomes = {}
                for candidate in proposed:
                    quantized += 1
                    status = verdict(candidate)
                    fp = predict(candidate_strategy(candidate, recipe.search))
                    print(f"  round {rounds:2d} {status:8s} {fp.bytes_per_token / 1e9:6.2f} GB/token "
                          f"{fp.decode_tok_s:6.1f} tok/s  {candidate.name(recipe.search.prefix)}  ({candidate.move})")
                    outcomes[candidate] = Outcome(status, kl=0.1, sensitivity=sensitivity)
                    if status == ACCEPTED:
                        accepted.append(candidate)
                        last = candidate
                proposed = procedure.send(outcomes)
        except StopIteration:
            pass
        budget = recipe.search.budget
        print(f"  -> {rounds} rounds, {quantized} candidates quantized (budget {budget.candidates}), every one "
              f"served when nothing is pruned (budget {budget.served}); ends at "
              + (f"{last.name(recipe.search.prefix)}" if last else "nothing accepted"))


if __name__ == "__main__":
    main()
