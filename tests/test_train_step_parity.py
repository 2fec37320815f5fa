"""One training step equal to PyTorch's on the same weights and batch: the train-mode forward pass, the BatchNorm
statistics update (PyTorch's unbiased running variance in every BatchNorm: the ResNet's, CBAM's spatial gate, BAM's
channel-gate BatchNorm1d over the batch alone), the gradients and SGD with momentum and weight decay.

The reference is the independent PyTorch implementation of the official code in ``tests/torch_reference.py``,
given random weights and statistics; our side runs the project's own ``steps.make_train_step`` with the optimiser
built from a config by ``optim.create_optimizer``.

float64: the changes one step makes (new minus old parameter, new minus old running statistic) equal PyTorch's to
1e-6 of their largest magnitude, so a step cannot look right just because the weights dominate it.
float32: the running statistics equal PyTorch's float64 ones to 1e-4, and the parameters are at least as close to
the float64 step as PyTorch's own float32 step is (or within 1e-4). A float32 rounding of a parameter is already
about 1e-3 of one step's change, and a random ResNet-50 in train mode at batch 4 amplifies rounding so much that
PyTorch's float32 step differs from its float64 step by several per cent; no float32 implementation can meet
1e-4 against it there, while both meet it on the ResNet-18.

    pytest tests/test_train_step_parity.py
"""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from attn_flax import convert
from attn_flax.training import optim, steps
from attn_flax.training.state import TrainState

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
CASES = {  # id: depth, stem, attention, batch, image height x width
    "resnet18_cifar_cbam": (18, "cifar", "cbam", 8, (32, 32)),
    "resnet50_imagenet_bam": (50, "imagenet", "bam", 4, (96, 96)),
}


@pytest.fixture(scope="module")
def torch_reference():
    pytest.importorskip("torch")
    import torch_reference as reference

    return reference


def sgd_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"weight_decay": WEIGHT_DECAY, "weight_decay_exclude_norm_and_bias": False,
                                      "momentum": MOMENTUM, "nesterov": False})


def torch_step(reference, images: np.ndarray, labels: np.ndarray, dtype) -> tuple[float, dict[str, np.ndarray]]:
    """One official-recipe step in PyTorch; returns the loss and the state dict after it."""
    import torch

    reference = reference.to(dtype).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    loss = torch.nn.functional.cross_entropy(reference(torch.from_numpy(images).to(dtype)),
                                             torch.from_numpy(labels))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    state = convert.clean_state_dict({k: v.detach().double() for k, v in reference.state_dict().items()})
    return float(loss.detach()), {key: value.copy() for key, value in state.items()}  # not views of the model


def flax_step(model, variables, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """The same step through the project's train step and optimiser; returns the loss and an official state dict."""
    schedule = optax.constant_schedule(LEARNING_RATE)
    tx = optim.create_optimizer(sgd_config(), schedule)
    params, batch_stats = variables["params"], variables["batch_stats"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
    batch = {"image": jnp.asarray(np.transpose(images, (0, 2, 3, 1))), "label": jnp.asarray(labels)}
    new_state, metrics = jax.jit(steps.make_train_step(model, tx, schedule))(state, batch)
    state_dict = convert.to_official({"params": new_state.params, "batch_stats": new_state.batch_stats})
    return float(metrics["train_loss"]), {k: np.asarray(v, np.float64) for k, v in state_dict.items()}


def in_dtype(model, variables, dtype):
    cast = jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64), dtype), variables)
    return model.clone(dtype=dtype, param_dtype=dtype), cast


def relative_error(ours: np.ndarray, expected: np.ndarray, scale: np.ndarray) -> float:
    return float(np.max(np.abs(ours - expected)) / max(np.max(np.abs(scale)), 1e-12))


@pytest.fixture(scope="module")
def setups(torch_reference):
    """Per case: the weights before the step, the batch, and PyTorch's float64 step (loss, state after)."""
    import torch

    cache = {}

    def get(case):
        if case not in cache:
            depth, stem, attention, batch, size = CASES[case]
            reference = torch_reference.randomize_(torch_reference.ResNet(depth, stem, 10, attention), seed=depth)
            rng = np.random.default_rng(depth)
            images, labels = rng.normal(size=(batch, 3, *size)), rng.integers(0, 10, size=batch)
            before = {key: value.copy() for key, value in convert.clean_state_dict(reference.state_dict()).items()}
            cache[case] = (reference, images, labels, before, torch_step(reference, images, labels, torch.float64))
        return cache[case]

    return get


def ours_step(case, before, images, labels, dtype):
    depth, stem, attention, _, _ = CASES[case]
    model = convert.official_model(depth, attention, stem, num_classes=10)
    variables = flax.traverse_util.unflatten_dict({
        path: convert._to_flax_layout(before[key], path[-1])
        for key, (path, _, _) in convert.official_layout(model).items()})
    with jax.enable_x64(dtype == "float64"):
        jdtype = jnp.float64 if dtype == "float64" else jnp.float32
        return flax_step(*in_dtype(model, variables, jdtype), images.astype(jdtype), labels)


def worst(errors: dict[str, float], n: int = 5) -> list[tuple[str, float]]:
    return sorted(errors.items(), key=lambda item: -item[1])[:n]


@pytest.mark.parametrize("case", list(CASES))
def test_one_float64_train_step_equals_pytorch(setups, case):
    _, images, labels, before, (torch_loss, expected) = setups(case)
    loss, ours = ours_step(case, before, images, labels, "float64")
    assert loss == pytest.approx(torch_loss, rel=1e-9)
    assert set(ours) == set(expected) and any(key.endswith("running_var") for key in expected)
    errors = {key: relative_error(ours[key], expected[key], expected[key] - before[key]) for key in expected}
    assert worst(errors)[0][1] < 1e-6, f"largest relative errors of the step's changes: {worst(errors)}"


@pytest.mark.parametrize("case", list(CASES))
def test_one_float32_train_step_is_as_accurate_as_pytorchs(setups, case):
    import torch

    reference, images, labels, before, (torch_loss, expected) = setups(case)
    loss, ours = ours_step(case, before, images, labels, "float32")
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()}, strict=False)
    _, torch32 = torch_step(reference, images, labels, torch.float32)
    assert loss == pytest.approx(torch_loss, rel=1e-5)
    errors = {key: relative_error(ours[key], expected[key], expected[key]) for key in expected}
    torch_errors = {key: relative_error(torch32[key], expected[key], expected[key]) for key in expected}
    statistics = {k: e for k, e in errors.items() if k.endswith(("running_mean", "running_var"))}
    assert worst(statistics)[0][1] < 1e-4, f"running statistics: {worst(statistics)}"
    bound = max(1e-4, 2 * max(torch_errors.values()))
    assert worst(errors)[0][1] < bound, (f"ours {worst(errors)}; PyTorch float32 against float64: "
                                         f"{worst(torch_errors)}")
