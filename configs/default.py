"""Default run: a small CBAM ResNet on the offline dataset, a few minutes on 2 CPU cores.

Command (the README's main command):

    python train.py --workdir=/tmp/attn_flax_default

Hardware: a laptop-class CPU (measured on 2 cores). Task: `attn_flax_shapes`, 10 shape classes placed at a
random position and scale in a cluttered 32x32 scene (generated on first use, no download). Expected result and
wall time: see the README ("The default run"). Every other config starts from this one's fields.
"""
import ml_collections
from ml_collections import config_dict


def attention_options() -> ml_collections.ConfigDict:
    """Every option of the registered modules as an unset placeholder, so the command line can set any of them
    (``--config.attention_options.reduction=8``); only the options that are set reach the module, which rejects
    the ones it does not take."""
    options = ml_collections.ConfigDict()
    for name, kind in (("reduction", int), ("kernel_size", int), ("pool_types", tuple), ("order", str),
                       ("spatial", bool), ("spatial_norm", bool), ("dilation", int), ("num_dilated_convs", int),
                       ("combine", str)):
        options[name] = config_dict.placeholder(kind)
    return options


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = "resnet18"
    config.attention = "cbam"
    config.attention_options = attention_options()
    config.stem = "cifar"
    config.widths = (16, 32, 64, 128)
    config.stage_sizes = (1, 1, 1, 1)
    config.zero_init_last_bn = False
    config.half_precision = False
    config.bn_group_size = config_dict.placeholder(int)  # examples per BatchNorm statistic; None: the global batch

    config.dataset = "attn_flax_shapes"
    config.data_dir = config_dict.placeholder(str)
    config.image_size = config_dict.placeholder(int)  # crop side of ImageNet-style datasets; None: 224
    config.cache = False

    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_train_steps = -1  # -1: num_epochs
    config.num_epochs = 1.25
    config.grad_accum_steps = 1

    config.base_learning_rate = 0.4
    config.schedule = "cosine"
    config.warmup_epochs = 0.2
    config.decay_epochs = ()
    config.decay_factor = 0.1
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 5e-4
    config.weight_decay_exclude_norm_and_bias = False
    config.label_smoothing = 0.0

    config.seed = 0
    # Each period in steps, or -1 and the same period in epochs (X_every_epochs); attn_flax.training.durations.
    config.log_every_steps = 50
    config.log_every_epochs = config_dict.placeholder(float)
    config.eval_every_steps = 10_000
    config.eval_every_epochs = config_dict.placeholder(float)
    config.checkpoint_every_steps = 500
    config.checkpoint_every_epochs = config_dict.placeholder(float)
    config.keep_checkpoints = 3
    return config
