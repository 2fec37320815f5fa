"""The training loop end to end on a tiny ResNet and the tiny offline dataset.

The slow part of these tests is XLA compilation; the persistent compilation cache set up in conftest.py lets
the runs after the first reuse the compiled steps.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, Mesh

from attn_flax import data
from attn_flax.training import loop, setup, sharding, steps
from attn_flax.training.state import init_train_state
from attn_flax.training.metrics import read_metrics
import tiny_runs
from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATASET = tiny_runs.TINY_DATASET


def tiny_config(data_dir, **overrides):
    return tiny_runs.config(data_dir, **dict(dict(num_train_steps=4, log_every_steps=2, checkpoint_every_steps=2),
                                             **overrides))


def final_params(workdir):
    step = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return step, restored["params"]


def test_round_trip_writes_metrics_checkpoints_and_config(tmp_path, data_dir):
    config = tiny_config(data_dir)
    result = loop.train_and_evaluate(config, str(tmp_path))

    events = read_metrics(str(tmp_path))
    train_events = [e for e in events if "train_loss" in e]
    eval_events = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in train_events] == [2, 4]
    for key in ("train_loss", "train_accuracy", "learning_rate", "steps_per_second", "examples_per_second"):
        assert np.isfinite(train_events[-1][key]), key
    assert len(eval_events) == 1 and eval_events[0]["step"] == 4
    assert eval_events[0]["eval_examples"] == 100 == data.dataset_info(TINY_DATASET, data_dir=data_dir).num_eval_examples
    for key in ("eval_loss", "eval_accuracy", "eval_top5_accuracy"):
        assert 0 <= eval_events[0][key] < 10
    assert result == {k: v for k, v in eval_events[0].items() if k != "step"}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert json.loads((tmp_path / "config.json").read_text())["widths"] == [8, 16, 16, 16]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_periods_given_in_epochs_are_kept_in_steps(tmp_path, data_dir):
    """500 examples at batch 16 are 31.25 steps per epoch: logging and checkpoints every 0.064 epochs are every
    2 steps, evaluation every 0.1 epochs every 3 steps (and at the end, as every periodic action)."""
    config = tiny_config(data_dir, log_every_steps=-1, log_every_epochs=0.064, checkpoint_every_steps=-1,
                         checkpoint_every_epochs=0.064, eval_every_steps=-1, eval_every_epochs=0.1)
    loop.train_and_evaluate(config, str(tmp_path))
    events = read_metrics(str(tmp_path))
    assert [e["step"] for e in events if "train_loss" in e] == [2, 4]
    assert [e["step"] for e in events if "eval_loss" in e] == [3, 4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_restarted_run_continues_from_its_latest_checkpoint(tmp_path, data_dir):
    """Stopped after 4 steps and restarted to 6, the run ends with the parameters of an uninterrupted 6-step run
    (constant learning rate, so the schedule does not depend on the planned length)."""
    stopped, uninterrupted = str(tmp_path / "stopped"), str(tmp_path / "uninterrupted")
    loop.train_and_evaluate(tiny_config(data_dir, schedule="constant", warmup_epochs=0.0), stopped)
    loop.train_and_evaluate(tiny_config(data_dir, schedule="constant", warmup_epochs=0.0, num_train_steps=6),
                            stopped)
    loop.train_and_evaluate(tiny_config(data_dir, schedule="constant", warmup_epochs=0.0, num_train_steps=6),
                            uninterrupted)

    train_steps = [e["step"] for e in read_metrics(stopped) if "train_loss" in e]
    assert train_steps == [2, 4, 6], "the restart logs steps 5-6 only"
    (step_a, params_a), (step_b, params_b) = final_params(stopped), final_params(uninterrupted)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)


def _two_steps(run, mesh, batches):
    """Two train steps of ``run``'s model on ``mesh``; returns the losses and the final params."""
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    state = jax.jit(lambda rng: init_train_state(run.model, run.tx, rng, (32, 32, 3)),
                    out_shardings=replicated)(jax.random.key(0))
    step_fn = jax.jit(steps.make_train_step(run.model, run.tx, run.schedule),
                      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated))
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, sharding.global_batch(batch, batch_sharding))
        losses.append(float(metrics["train_loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.heavy
def test_four_devices_give_the_loss_of_one_device(data_dir):
    """Data parallelism does not change the maths: BatchNorm statistics and gradients are global."""
    assert jax.device_count() >= 4, "conftest.py asks XLA for 4 CPU devices"
    run = setup.prepare(tiny_config(data_dir))
    stream = data.train_batches(TINY_DATASET, global_batch_size=16, seed=0, data_dir=data_dir)
    batches = [next(iter(stream)) for _ in range(2)]
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
    four = Mesh(np.asarray(jax.devices()[:4]), ("data",), axis_types=(AxisType.Auto,))
    losses_1, params_1 = _two_steps(run, one, batches)
    losses_4, params_4 = _two_steps(run, four, batches)
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_4), jax.tree.leaves(params_1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.heavy
@pytest.mark.xdist_group("multi_process")
def test_two_processes_over_jax_distributed(tmp_path, data_dir):
    """Two processes with 2 CPU devices each on loopback: a 4-device mesh, eval counts every example once."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".jax_cache"), "PYTHONUNBUFFERED": "1"}
    args = [f"--workdir={tmp_path}", "--config.dataset=" + TINY_DATASET, f"--config.data_dir={data_dir}",
            "--config.widths=(8,16,16,16)", "--config.stage_sizes=(1,1,1,1)", "--config.batch_size=16",
            "--config.eval_batch_size=24", "--config.num_train_steps=2", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=2", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args, f"--process_id={i}"],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    events = read_metrics(str(tmp_path))
    assert [e["step"] for e in events if "train_loss" in e] == [1, 2], "only process 0 writes, once per event"
    assert [e["eval_examples"] for e in events if "eval_loss" in e] == [100]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
