"""Test-session setup: several CPU devices and a persistent XLA compilation cache.

Both must be configured before jax is imported anywhere, so this file sets the environment at import
time; pytest imports conftest.py before any test module.
"""
import os
import pathlib
import socket

NUM_TEST_DEVICES = 4

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={NUM_TEST_DEVICES}".strip()

import jax  # noqa: E402

_cache_dir = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_cache_dir))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402

TINY_DATASET = "attn_flax_shapes/tiny"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A TFDS directory with the tiny offline dataset (500 train / 100 eval) prepared, shared by the session."""
    from attn_flax import data

    path = str(tmp_path_factory.mktemp("tfds"))
    data.dataset_info(TINY_DATASET, data_dir=path)
    return path


def free_port() -> int:
    """A TCP port on loopback that is free now, for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    """The folder of the tiny training workdirs the tool tests share (tests/tiny_runs.py)."""
    return tmp_path_factory.getbasetemp() / "tools"


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory) -> str:
    """A TFDS directory with imagenet2012 prepared from fabricated archives in the real layout.

    ILSVRC2012_img_train.tar (1,000 per-synset inner tars of one 40x48 JPEG each, plus the builder's 22 CMYK
    JPEGs and its PNG named .JPEG as real CMYK and PNG files) and ILSVRC2012_img_val.tar (300 JPEGs named
    ILSVRC2012_val_%08d.JPEG), prepared by `python -m attn_flax.data.prepare`'s code with TFDS's own builder.
    """
    from attn_flax.data import prepare, testing

    root = tmp_path_factory.mktemp("imagenet")
    counts = testing.write_imagenet_archives(str(root / "manual"), num_val=IMAGENET_NUM_VAL)
    assert counts == {"train": IMAGENET_NUM_TRAIN, "validation": IMAGENET_NUM_VAL}
    prepare.prepare("imagenet2012", data_dir=str(root / "tfds"), manual_dir=str(root / "manual"))
    return str(root / "tfds")


IMAGENET_NUM_TRAIN = 1000 + 22 + 1
IMAGENET_NUM_VAL = 300


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A local GCS server with one empty bucket (tests/gcs_server.py), started once for the session and stopped after
    it. Fails (never skips) when it cannot start. Port 443 is machine-wide: the tests that use it share one
    xdist group."""
    import gcs_server as emulator

    state = tmp_path_factory.mktemp("gcs_emulator")
    server = emulator.start(state, free_port())
    try:
        yield server
    finally:
        emulator.stop(state)
