"""An independent PyTorch implementation of the official CBAM/BAM ResNet, the reference of the parity tests.

Written from the facts in REFERENCE.md sections 1-2 (Jongchan/attention-module, ``MODELS/model_resnet.py``),
with its module names, so that ``state_dict()`` keys are those of the official checkpoints: ``conv1``, ``bn1``,
``layer{s}.{b}.{conv1,bn1,...,downsample.0,downsample.1}``, ``layer{s}.{b}.cbam.ChannelGate.mlp.{1,3}``,
``layer{s}.{b}.cbam.SpatialGate.spatial.{conv,bn}``, ``bam{s}.channel_att.gate_c.*``,
``bam{s}.spatial_att.gate_s.*`` and ``fc``. The official code's BAM bugs (an undefined name, an H-only
average pool) are left out. SE (two biased Linear layers, C -> C/16 -> C) and ECA (a bias-free Conv1d) have no
official checkpoint format; they are here for parameter counts. ``groups``/``width_per_group`` give the
torchvision ResNeXt/Wide ResNet bottleneck.
"""
import collections
import math

import torch
from torch import nn
from torch.nn import functional as F

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class CBAMChannelGate(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, channels // reduction), nn.ReLU(),
                                 nn.Linear(channels // reduction, channels))

    def forward(self, x):
        logits = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(logits)[:, :, None, None]


class ConvBN(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class CBAMSpatialGate(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        self.spatial = ConvBN(2, 1, kernel_size)

    def forward(self, x):
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.ChannelGate = CBAMChannelGate(channels, reduction)
        self.SpatialGate = CBAMSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class BAMChannelGate(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = channels // reduction
        self.gate_c = nn.Sequential(collections.OrderedDict([
            ("flatten", nn.Flatten()),
            ("gate_c_fc_0", nn.Linear(channels, hidden)),
            ("gate_c_bn_1", nn.BatchNorm1d(hidden)),
            ("gate_c_relu_1", nn.ReLU()),
            ("gate_c_fc_final", nn.Linear(hidden, channels)),
        ]))

    def forward(self, x):
        return self.gate_c(x.mean(dim=(2, 3)))[:, :, None, None]


class BAMSpatialGate(nn.Module):
    def __init__(self, channels, reduction=16, num_dilated=2, dilation=4):
        super().__init__()
        hidden = channels // reduction
        layers = [("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, 1)),
                  ("gate_s_bn_reduce0", nn.BatchNorm2d(hidden)),
                  ("gate_s_relu_reduce0", nn.ReLU())]
        for i in range(num_dilated):
            layers += [(f"gate_s_conv_di_{i}", nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)),
                       (f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden)),
                       (f"gate_s_relu_di_{i}", nn.ReLU())]
        layers.append(("gate_s_conv_final", nn.Conv2d(hidden, 1, 1)))
        self.gate_s = nn.Sequential(collections.OrderedDict(layers))

    def forward(self, x):
        return self.gate_s(x)


class BAM(nn.Module):
    """The official code's BAM: x * (1 + sigmoid(M_c(x) * M_s(x))), the PRODUCT of the two branches."""

    def __init__(self, channels):
        super().__init__()
        self.channel_att = BAMChannelGate(channels)
        self.spatial_att = BAMSpatialGate(channels)

    def forward(self, x):
        return x * (1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x)))


class SE(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class ECA(nn.Module):
    def __init__(self, channels):
        super().__init__()
        t = int(abs(math.log2(channels) / 2 + 0.5))
        k = t if t % 2 else t + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        gate = torch.sigmoid(self.conv(x.mean(dim=(2, 3))[:, None, :]))[:, 0]
        return x * gate[:, :, None, None]


BLOCK_ATTENTION = {"cbam": CBAM, "se": SE, "eca": ECA}


def _attach_block_attention(block, attention, channels):
    if attention in BLOCK_ATTENTION:
        setattr(block, attention, BLOCK_ATTENTION[attention](channels))
        block.attention_name = attention
    else:
        block.attention_name = None


def _apply_block_attention(block, out):
    return getattr(block, block.attention_name)(out) if block.attention_name else out


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, attention=None, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        _attach_block_attention(self, attention, planes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = _apply_block_attention(self, self.bn2(self.conv2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, attention=None, groups=1, width_per_group=64):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        _attach_block_attention(self, attention, planes * 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = _apply_block_attention(self, self.bn3(self.conv3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNet(nn.Module):
    """The official ResNet: ``network_type`` 'imagenet' or 'cifar', attention None/'cbam'/'bam'/'se'/'eca'."""

    def __init__(self, depth, network_type, num_classes, attention=None, groups=1, width_per_group=64):
        super().__init__()
        block = BasicBlock if depth < 50 else Bottleneck
        self.network_type = network_type
        self.inplanes = 64
        if network_type == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        if attention == "bam":
            self.bam1 = BAM(64 * block.expansion)
            self.bam2 = BAM(128 * block.expansion)
            self.bam3 = BAM(256 * block.expansion)
        else:
            self.bam1 = self.bam2 = self.bam3 = None
        options = dict(attention=attention, groups=groups, width_per_group=width_per_group)
        sizes = STAGE_SIZES[depth]
        self.layer1 = self._make_layer(block, 64, sizes[0], 1, options)
        self.layer2 = self._make_layer(block, 128, sizes[1], 2, options)
        self.layer3 = self._make_layer(block, 256, sizes[2], 2, options)
        self.layer4 = self._make_layer(block, 512, sizes[3], 2, options)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride, options):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **options)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.network_type == "imagenet":
            x = F.max_pool2d(x, 3, stride=2, padding=1)
        for layer, bam in ((self.layer1, self.bam1), (self.layer2, self.bam2), (self.layer3, self.bam3)):
            x = layer(x)
            if bam is not None:
                x = bam(x)
        x = self.layer4(x)
        return self.fc(x.mean(dim=(2, 3)))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, as the papers count them (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every parameter and BatchNorm statistic random, non-trivial values (in place), for parity tests.

    Weights keep their scale (a random multiplier per tensor), BN scales and the CBAM spatial-gate BN scale
    lie in [0.5, 1.5], biases and running means in N(0, 0.1^2), running variances in [0.5, 1.5].
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    return model
