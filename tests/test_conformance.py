"""transformers' generic model tests (ModelTesterMixin) against every attention kind, stock Llama as control.

Each kind runs at reduced rank, so the cache is really factorized. Every generic test must pass or skip for
the suite's own reason (no GPU, no flash-attention, not a composite model, ...), as the stock Llama does; the
only extra skip is a test of a mixin that the sdist does not ship (NOT_IN_SDIST).
"""

import os
import unittest
from pathlib import Path

import pytest
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.auto import modeling_auto

import factorconv  # noqa: F401  (registers the Auto classes)
from factorconv.modeling import FactorConvConfig, FactorConvForCausalLM, FactorConvModel

try:
    from hf_suite import load_modeling_common

    common = load_modeling_common()
except Exception as error:  # no index reachable, no sdist: say so; CI sets the variable and turns red instead
    if os.environ.get("FACTORCONV_REQUIRE_CONFORMANCE"):
        raise
    pytest.skip(f"transformers' generic tests unavailable: {error}", allow_module_level=True)

SHAPE = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
KINDS = {
    "tpa": dict(attention="tpa", tpa_rank_k=1, tpa_rank_v=1),
    "tpa_contextual": dict(attention="tpa", tpa_rank_k=1, tpa_rank_v=2, tpa_contextual=True),
    "mfa": dict(attention="mfa", key_dim=8, value_dim=8),
    "mfa_kr": dict(attention="mfa_kr", rope_dim=8, nope_dim=8),
}

# Generic tests that cannot run from the sdist, for the control as for every kind.
NOT_IN_SDIST = {
    "test_generation_tester_mixin_inheritance": "tests/generation/ is not in the sdist; generation is tested in "
    "tests/test_cache.py and tests/test_generation.py",
}

# transformers' tests look model classes up in its own name tables (e.g. to give causal LMs labels); a model that
# lives outside transformers registers there only for this module.
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("factorconv", "FactorConvForCausalLM")
modeling_auto.MODEL_MAPPING_NAMES.setdefault("factorconv", "FactorConvModel")


class ModelTester:
    """The small model and inputs the generic tests build (the role of transformers' CausalLMModelTester)."""

    __test__ = False

    batch_size, seq_length, is_training = 3, 7, True
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads = 99, 32, 2, 4

    def __init__(self, parent: unittest.TestCase, kind: dict | None) -> None:
        self.parent, self.kind = parent, kind

    def get_config(self):
        if self.kind is None:
            return LlamaConfig(**SHAPE)
        return FactorConvConfig(**SHAPE, **self.kind)

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = common.random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class _Case(common.ModelTesterMixin):
    kind: dict | None = None
    test_torch_exportable = False  # the exporters mixin is not in the sdist

    def setUp(self) -> None:
        self.model_tester = ModelTester(self, self.kind)
        if self._testMethodName in NOT_IN_SDIST:
            self.skipTest(NOT_IN_SDIST[self._testMethodName])


class TestStockLlama(_Case, unittest.TestCase):
    all_model_classes = (LlamaModel, LlamaForCausalLM)


def _kind_case(name: str, kind: dict) -> type:
    cls = type(f"TestFactorConv_{name}", (_Case, unittest.TestCase), {"kind": kind})
    cls.all_model_classes = (FactorConvModel, FactorConvForCausalLM)
    return cls


for _name, _kind in KINDS.items():
    globals()[f"TestFactorConv_{_name}"] = _kind_case(_name, _kind)


def test_suite_is_the_installed_release():
    """The generic tests come from the release we run against, and they are many (not a stub)."""
    assert Path(common.__file__).parents[1].name == transformers.__version__
    assert len([name for name in dir(common.ModelTesterMixin) if name.startswith("test_")]) > 100
