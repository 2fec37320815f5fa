"""ImageNet (ILSVRC-2012) on the official recipe, for any depth and attention.

Command (the argument after the colon is `MODEL,ATTENTION`; ATTENTION is none, se, eca, cbam or bam):

    python train.py --config=configs/imagenet.py:resnet50,cbam --workdir=gs://BUCKET/r50_cbam
    python train.py --config=configs/imagenet.py:resnet101,bam --workdir=/ckpt/r101_bam
    python train.py --config=configs/imagenet.py:mobilenet_v1,cbam --workdir=gs://BUCKET/mobilenet_cbam

MODEL is any ResNet or one of the CBAM/BAM papers' other ImageNet networks: resnext50_32x4d, resnext101_32x4d,
wrn18_1_5, wrn18_2, mobilenet_v1 (parameter counts against the papers: docs/models.md). The CIFAR-only networks
(preresnet*, wrn16_8, wrn28_*, resnext29_*) fail here in one line. The papers trained MobileNet with this same
recipe (the CBAM paper's Sec. 4.2 applies it to every network), not MobileNet's own RMSProp schedule.

Hardware: a TPU v3-32/v4-32 pod slice (one process per host, `jax.distributed` initialises itself) or 8
GPUs; about a day for ResNet-50 on 8 V100-class GPUs. Needs `imagenet2012` prepared from the manual download
(ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in `<data_dir>/downloads/manual`, then
`python -m attn_flax.data.prepare imagenet2012 --data_dir=<data_dir>`, which writes the array_record files the
pipeline reads, without apache_beam; see docs/data.md), then --config.data_dir=<data_dir>.
`--config.image_size=N` trains and evaluates at N x N crops instead of 224 (e.g. 128 for quick ablations).

Recipe (official `train_imagenet.py`): SGD momentum 0.9, lr 0.1 per 256 examples, weight decay 1e-4 on every
parameter, 90 epochs with x0.1 at epochs 30 and 60 (the released CBAM weights trained 100), random-sized crop
224 + flip, eval resize 256 + center crop 224. The batch here is 1024 with the lr scaled linearly and 5 warmup
epochs (Goyal et al., 2017), which reaches the batch-256 accuracy; set batch_size=256, warmup_epochs=0 for the
exact official recipe.

BatchNorm statistics: `bn_group_size = 64`, as the official runs computed them (nn.DataParallel, batch 256 on 4
GPUs: each replica normalised its own 64 examples, unsynchronised), so that results compare with the papers
whatever the number of devices here; with a batch of 1024 that is 16 groups, and Goyal et al. likewise keep the
statistics per worker at 32. Set it to None for statistics over the whole global batch.

Expected top-1 error, ResNet-50 (CBAM paper, Table 4 / BAM paper): 24.56 none, 23.14 SE, 22.66 CBAM,
24.02 BAM. Released official weights: ResNet-50+CBAM 77.62 top-1, ResNet-50+BAM 76.86. ResNet-101: see the
CBAM paper's Table 4 (+CBAM improves it by a similar margin).
"""
import ml_collections
from ml_collections import config_dict

from configs import cifar_base, default


def get_config(arch: str = "resnet50,cbam") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model, config.attention = cifar_base.parse_arch(arch)
    config.dataset = "imagenet2012"
    config.stem = "imagenet"
    config.widths = config_dict.placeholder(tuple)  # None: the depth's own; e.g. --config.widths=(32,64,128,256)
    config.stage_sizes = config_dict.placeholder(tuple)
    config.half_precision = True
    config.bn_group_size = 64

    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.num_epochs = 90.0
    config.base_learning_rate = 0.1
    config.schedule = "step"
    config.decay_epochs = (30, 60)
    config.decay_factor = 0.1
    config.warmup_epochs = 5.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.weight_decay_exclude_norm_and_bias = False

    config.log_every_steps = 100
    config.eval_every_steps, config.eval_every_epochs = -1, 5.0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    return config
