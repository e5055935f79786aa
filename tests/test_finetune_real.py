"""Healing real weights: stories260K converted to TPA at R_K = R_V = 1 (a quarter of its KV bytes), a short
distillation run on TinyStories text, perplexity on held-out TinyStories-valid.txt. The full demo with the
numbers quoted in the README is benchmarks/heal_stories.py. Skipped when ../shared/real is absent
(fails then if FACTORCONV_REQUIRE_REAL is set, as in CI)."""

import json

import pytest
from conftest import REAL

from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.finetune import FinetuneOptions, finetune
from factorconv.finetune.output import SUMMARY_FILE

SOURCE = REAL / "stories260K-hf"
TRAIN = REAL / "tinystories" / "tinystories.txt"
VALID = REAL / "tinystories" / "TinyStories-valid.txt"

pytestmark = pytest.mark.real(SOURCE / "config.json", TRAIN, VALID)  # conftest skips or fails without them


def test_short_healing_of_stories260k_tpa_rank_1_improves_perplexity(tmp_path):
    converted = convert(
        ConvertOptions(source=str(SOURCE), output=tmp_path / "tpa1", rank_k=1, rank_v=1), progress=False
    )
    healed = finetune(
        FinetuneOptions(
            model=str(converted),
            output=tmp_path / "healed",
            data=[str(TRAIN)],
            eval_data=str(VALID),
            eval_tokens=4096,
            steps=30,
            seq_len=256,
            batch_size=4,
            lr=1e-2,
        ),
        progress=False,
    )
    summary = json.loads((healed / SUMMARY_FILE).read_text())
    ev = summary["eval"]
    assert summary["teacher"] == str(SOURCE)  # the source recorded by the conversion
    assert ev["teacher_ppl"] < 7 < 50 < ev["before_ppl"]  # the conversion at R = 1 is poor zero-shot
    assert ev["after_ppl"] < 0.5 * ev["before_ppl"], ev
