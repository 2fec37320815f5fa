"""The shared CIFAR recipe; configs/cifar10.py and configs/cifar100.py set the dataset and architecture.

SGD momentum 0.9, lr 0.1 at batch 128 (0.2 per 256 examples), weight decay 5e-4 on every parameter, 200
epochs with x0.1 at epochs 100 and 150, no warmup, no label smoothing; the official CIFAR stem (3x3 conv,
no max-pool) and full-width ResNets.
"""
import ml_collections

from configs import default


def parse_arch(arch: str) -> tuple[str, str]:
    """'resnet18,cbam' -> ('resnet18', 'cbam'); the attention defaults to 'none'."""
    model, _, attention = arch.partition(",")
    return model.strip(), (attention.strip() or "none")


def get_config(dataset: str, arch: str) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model, config.attention = parse_arch(arch)
    config.dataset = dataset
    config.stem = "cifar"
    config.widths = None
    config.stage_sizes = None

    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 200.0
    config.base_learning_rate = 0.2
    config.schedule = "step"
    config.decay_epochs = (100, 150)
    config.decay_factor = 0.1
    config.warmup_epochs = 0.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 5e-4

    config.log_every_steps = 100
    config.eval_every_steps, config.eval_every_epochs = -1, 10.0
    config.checkpoint_every_steps, config.checkpoint_every_epochs = -1, 10.0
    return config
