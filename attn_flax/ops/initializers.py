"""Weight initialisers that reproduce the official PyTorch code's initialisation.

The official ResNet (Jongchan/attention-module, ``MODELS/model_resnet.py``) initialises by parameter name:
every conv weight Kaiming-normal with ``mode='fan_out'``, the FC weight Kaiming-normal (fan-in), every
BatchNorm scale 1 except the CBAM spatial-gate BN scale (0), and every bias 0. Linear layers inside the
attention MLPs keep PyTorch's default ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
Shared by the attention modules and the networks, so it sits on the floor both build on.
"""
from flax import linen as nn

conv_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""PyTorch ``kaiming_normal_(mode='fan_out')``: N(0, 2 / (out_channels * kh * kw)), not truncated."""

dense_kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
"""PyTorch ``kaiming_normal_`` (fan-in), used by the official code for the classifier."""

torch_default_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""PyTorch's default Linear/Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()
