"""CIFAR-10 with the official CIFAR ResNet stem, for any depth and attention.

Command (the argument after the colon is `MODEL,ATTENTION`; ATTENTION is none, se, eca, cbam or bam):

    python train.py --config=configs/cifar10.py:resnet18,cbam --workdir=/tmp/c10_r18_cbam
    python train.py --config=configs/cifar10.py:resnet50,bam --workdir=/tmp/c10_r50_bam

Hardware: one GPU (about an hour for ResNet-18 on an A100/H100-class card) or a TPU v3-8; on 2 CPU cores a
ResNet-18 epoch takes tens of minutes. Needs CIFAR-10 prepared once, on a machine with network:
`python -m attn_flax.data.prepare cifar10 --data_dir=<data_dir>`, then --config.data_dir=<data_dir>.

Recipe: the common CIFAR ResNet recipe (SGD momentum 0.9, lr 0.1 at batch 128, weight decay 5e-4, 200
epochs, x0.1 at epochs 100 and 150, pad-4 random crop + flip). Expected: ResNet-18 about 95% top-1 and
ResNet-50 about 95%, attention adding a few tenths; the CBAM and BAM papers give no CIFAR-10 numbers.
"""
import ml_collections

from configs import cifar_base


def get_config(arch: str = "resnet18,cbam") -> ml_collections.ConfigDict:
    return cifar_base.get_config("cifar10", arch)
