"""An export's format in words: the name in titles and repository names, its Hub tags, and what the
checkpoint stores, all read from the format registry (runner/quantization/formats.py); and the check of
a repository name that claims another format. The gates step names the selected export with it once
(its selection record), and the card and publish read that name.
"""

from __future__ import annotations

import re
from typing import Any

from runner.quantization import formats
from runner.quantization.bits import base_format

# An export's quant_algo (hf_quant_config.json) in words: the name in titles and repo names, its Hub
# tags, and what the checkpoint stores (runner/quantization/formats.py, each format's `card`).
EXPORT_FORMATS: dict[str, tuple[str, tuple[str, ...], str]] = {
    algo: (card.name, card.tags, card.description) for algo, card in formats.card_words().items()}
FORMAT_TAGS = formats.format_tags()
# Words in a repository name that claim a format.
_FORMAT_WORDS = formats.name_words()
# Layer formats (the quantize record's names) in titles and tags, for mixed-precision exports.
_LAYER_FORMAT_WORDS = formats.layer_words()


def export_format(quant_algo: str | None, layer_formats: dict[str, int] | None) -> dict[str, Any]:
    """The selected export's format in words: {"name", "tags", "description"}."""
    algo = (quant_algo or "").upper()
    if algo == "MIXED_PRECISION":
        counts = {k: v for k, v in (layer_formats or {}).items() if base_format(k) in _LAYER_FORMAT_WORDS}
        words = list(dict.fromkeys(_LAYER_FORMAT_WORDS[base_format(k)] for k in
                                   sorted(counts, key=lambda k: -counts[k])))
        parts = ", ".join(f"{n} in {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return {"name": "-".join(words) + "-Mixed", "tags": [w.lower() for w in words] + ["mixed-precision"],
                "description": f"mixed precision chosen per layer: Linear layers {parts}; the rest 16-bit"}
    name, tags, description = EXPORT_FORMATS.get(algo, (algo or "unknown", (algo.lower(),) if algo else (),
                                                        f"ModelOpt export format {algo or 'not recorded'}"))
    return {"name": name, "tags": list(tags), "description": description}


def repo_name_mismatch(repo_id: str | None, format_name: str) -> str | None:
    """A repository name that claims another format than the export's: the name it should have."""
    if not repo_id:
        return None
    owner, name = repo_id.split("/", 1)
    parts = re.split(r"([-_.])", name)
    claimed = [i for i, part in enumerate(parts) if part.upper() in _FORMAT_WORDS]
    if not claimed or {parts[i].upper() for i in claimed} == set(format_name.upper().split("-")):
        return None
    first, last = claimed[0], claimed[-1]
    return f"{owner}/{''.join(parts[:first])}{format_name}{''.join(parts[last + 1:])}"
