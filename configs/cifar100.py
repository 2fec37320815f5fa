"""CIFAR-100 with the official CIFAR ResNet stem, for any depth and attention.

Command (the argument after the colon is `MODEL,ATTENTION`; ATTENTION is none, se, eca, cbam or bam):

    python train.py --config=configs/cifar100.py:resnet50,bam --workdir=/tmp/c100_r50_bam
    python train.py --config=configs/cifar100.py:resnet18,cbam --workdir=/tmp/c100_r18_cbam

Hardware: one GPU or a TPU v3-8, as configs/cifar10.py. Needs CIFAR-100 prepared by TFDS.

Expected (BAM paper, Table 2, ResNet-50 on CIFAR-100, top-1 error): 21.49 without attention, 20.00 with BAM;
users of the official code report reproducing about 21.1 with BAM. No paper number for ResNet-18 or CBAM on
CIFAR-100.
"""
import ml_collections

from configs import cifar_base


def get_config(arch: str = "resnet50,bam") -> ml_collections.ConfigDict:
    return cifar_base.get_config("cifar100", arch)
