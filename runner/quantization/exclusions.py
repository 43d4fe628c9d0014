"""Whether an exclusion pattern names a module, the way ModelOpt reads it: one rule for the footprint,
the quantize worker and verify.

ModelOpt reads a pattern in two ways, and the worker hands the recipe's exclusions to both:

- as a quant_cfg key (`{quantizer_name: PATTERN, enable: false}` appended to a preset or ModelOpt
  recipe): `fnmatch` on quantizer names, `<module>.weight_quantizer` / `<module>.input_quantizer`
  (modelopt/torch/quantization/conversion.py, `_match_quantizer`);
- as an auto_quantize `disabled_layers` glob: `fnmatch` on the module name itself
  (algorithms.py, `AutoQuantizeSearcher`).

So `*lm_head*` and `*layers.0.*` name a Linear both ways, `*mlp.gate` (no trailing dot) only as a
module name, `*mlp.gate.*` and `*.weight_quantizer` only as a quantizer name, and `lm_head` only as
a module name; `model.layers.0` (a decoder layer, not a Linear) names nothing either way.
`fnmatch.fnmatch` on POSIX is `fnmatchcase`: case-sensitive, `*` crosses dots, `[...]` is a set.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable

# Module-name globs that auto_quantize must never quantize (its `disabled_layers`; ModelOpt's presets
# disable the same through configs/ptq/units/default_disabled_quantizers.yaml, but auto_quantize
# ignores the presets' exclusions). ModelOpt 0.47's own list for auto_quantize recipes
# (configs/auto_quantize/units/base_disabled_layers.yaml) plus the output head, vision towers and MTP
# heads, and routers named exactly `mlp.gate` (a module name has no trailing dot).
DEFAULT_DISABLED = [
    "*lm_head*", "*router*", "*mlp.gate", "*mlp.gate.*", "*block_sparse_moe.gate*", "*shared_expert_gate*",
    "*mlp.shared_expert_gate.*", "*linear_attn.conv1d*", "*self_attention.conv1d*", "*mixer.conv1d*",
    "*linear_attn.in_proj_a*", "*linear_attn.in_proj_b*", "*visual*", "*vision*", "*embed_vision*",
    "*vision_tower*", "*multi_modal_projector*", "*mtp*", "*output_layer*", "*proj_out.*", "output.*",
]


@functools.cache
def _compiled(pattern: str) -> Callable[[str], re.Match[str] | None]:
    # Compiled once: a MoE model has tens of thousands of expert Linears, each matched against every entry.
    return re.compile(fnmatch.translate(pattern)).match


def matches(pattern: str, name: str) -> bool:
    """ModelOpt's test of one pattern on one name (a quantizer name for a quant_cfg key, a module name for
    a disabled_layers glob): the whole name, fnmatch, case-sensitive."""
    return _compiled(pattern)(name) is not None


def names_module(pattern: str, module: str) -> bool:
    """Whether `pattern` excludes the Linear `module` in either of ModelOpt's readings: its weight
    quantizer as a quant_cfg key (presets, ModelOpt recipes) or the module as a disabled_layers glob
    (auto_quantize). For a check that does not know which reading applied (verify, the unmatched-pattern
    warning); an input-quantizer-only pattern (`*input_quantizer`) leaves the weight quantized, so it
    does not count."""
    return matches(pattern, module) or matches(pattern, f"{module}.weight_quantizer")
