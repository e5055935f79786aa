"""Pure maths that turns source projection weights (and, optionally, statistics) into factorized ones.

Nothing here reads or writes files: inputs are tensors, outputs are tensors.
"""
