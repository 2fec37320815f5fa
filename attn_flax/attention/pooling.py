"""Global poolings over the spatial axes of an NHWC map, as the CBAM channel gate uses them.

Reductions run in float32 whatever the activation dtype, since a bfloat16 sum over thousands of positions
loses most of its mantissa; the result is cast back to the input dtype.
"""
import jax.numpy as jnp
from jax.scipy.special import logsumexp

POOL_TYPES = ("avg", "max", "lp", "lse")


def global_pool(x: jnp.ndarray, pool_type: str) -> jnp.ndarray:
    """Pools ``x`` [N, H, W, C] over H and W to [N, C].

    ``avg``: mean; ``max``: maximum; ``lp``: the L2 norm sqrt(sum x^2) (PyTorch ``lp_pool2d`` with p=2 over the
    whole map); ``lse``: log-sum-exp. These are the official CBAM code's four pool types.
    """
    x32 = x.astype(jnp.float32)
    if pool_type == "avg":
        pooled = jnp.mean(x32, axis=(1, 2))
    elif pool_type == "max":
        pooled = jnp.max(x32, axis=(1, 2))
    elif pool_type == "lp":
        pooled = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(1, 2)))
    elif pool_type == "lse":
        pooled = logsumexp(x32, axis=(1, 2))
    else:
        raise ValueError(f"unknown pool type {pool_type!r}; valid: {', '.join(POOL_TYPES)}")
    return pooled.astype(x.dtype)

