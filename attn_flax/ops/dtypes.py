"""The dtype reductions and matrix products accumulate in: at least float32, and float64 for float64 inputs."""
from typing import Any

import jax.numpy as jnp


def accumulation_dtype(*dtypes: Any) -> jnp.dtype:
    """float32 for bfloat16/float16 (and float32) operands, float64 when any operand is float64."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)
