"""The factorized-attention architectures; self-contained so the files can travel with the weights."""

from .configuration_factorconv import FactorConvConfig
from .modeling_factorconv import FactorCacheLayer, FactorConvForCausalLM, FactorConvModel

__all__ = ["FactorCacheLayer", "FactorConvConfig", "FactorConvForCausalLM", "FactorConvModel"]
