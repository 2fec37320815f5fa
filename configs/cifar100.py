"""CIFAR-100 with the official CIFAR ResNet stem, for any depth and attention.

Command (the argument after the colon is `MODEL,ATTENTION`; ATTENTION is none, se, eca, cbam or bam):

    python train.py --config=configs/cifar100.py:resnet50,bam --workdir=/tmp/c100_r50_bam
    python train.py --config=configs/cifar100.py:resnet18,cbam --workdir=/tmp/c100_r18_cbam
    python train.py --config=configs/cifar100.py:preresnet110,bam --workdir=/tmp/c100_preresnet110_bam

MODEL is any ResNet (with the CIFAR stem) or one of the BAM paper's CIFAR networks: preresnet56, preresnet110,
wrn16_8, wrn28_8, wrn28_10, resnext29_8x64d, resnext29_16x64d (their parameter counts against the paper's Table
3: docs/models.md). The ImageNet-only networks (mobilenet_v1, wrn18_*, resnext101_32x4d) fail here in one line.

Hardware: one GPU or a TPU v3-8, as configs/cifar10.py. Needs CIFAR-100 prepared by TFDS.

Expected (BAM paper, Table 2, ResNet-50 on CIFAR-100, top-1 error): 21.49 without attention, 20.00 with BAM;
users of the official code report reproducing about 21.1 with BAM. No paper number for ResNet-18 or CBAM on
CIFAR-100.
"""
import ml_collections

from configs import cifar_base


def get_config(arch: str = "resnet50,bam") -> ml_collections.ConfigDict:
    return cifar_base.get_config("cifar100", arch)
