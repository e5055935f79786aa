"""The floating-point dtypes that options and saved configs name, as torch dtypes (one table for every command)."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
