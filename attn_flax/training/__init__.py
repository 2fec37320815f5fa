"""Data-parallel training: sharding, optimiser, steps, checkpoints, metrics and the loop that joins them.

The library never names an attention module or a dataset: it receives a config and asks ``attn_flax.models``
and ``attn_flax.data`` for them.
"""
