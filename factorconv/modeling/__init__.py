"""The factorized-attention architectures; self-contained so the files can travel with the weights."""

from .configuration_factorconv import FactorConvConfig
from .modeling_factorconv import CACHE_KEY, FactorConvForCausalLM, FactorConvModel, output_cache

__all__ = ["CACHE_KEY", "FactorConvConfig", "FactorConvForCausalLM", "FactorConvModel", "output_cache"]
