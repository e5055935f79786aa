"""factorconv: retrofit pretrained Llama-family models with factorized, much smaller KV caches.

Importing the package registers the factorconv architecture with transformers' Auto classes, so
installed users load converted folders without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import FactorConvConfig, FactorConvForCausalLM, FactorConvModel

AutoConfig.register(FactorConvConfig.model_type, FactorConvConfig, exist_ok=True)
AutoModel.register(FactorConvConfig, FactorConvModel, exist_ok=True)
AutoModelForCausalLM.register(FactorConvConfig, FactorConvForCausalLM, exist_ok=True)

__version__ = "0.2.0"
__all__ = ["FactorConvConfig", "FactorConvForCausalLM", "__version__"]
