"""attn_flax: BAM, CBAM, SE and ECA attention for ResNets in JAX/Flax."""

__version__ = "0.1.0"
