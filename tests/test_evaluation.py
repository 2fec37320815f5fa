"""eval.py and attn_flax.training.evaluation: full-split scores equal a direct computation; bad inputs fail in one line."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_runs
from attn_flax import convert, data, models, trained
from attn_flax.training import checkpoints, evaluation, optim, setup

EVAL = str(tiny_runs.REPO / "eval.py")


@pytest.fixture(scope="module")
def workdir(root):
    return tiny_runs.workdir(root, "cbam")


@pytest.fixture(scope="module")
def converted(root):
    """A converted-checkpoint directory holding a full-depth CIFAR ResNet-18 (no attention) for 10 classes."""
    model = models.create_model("resnet18", num_classes=10, attention=None, stem="cifar")
    variables = model.init(jax.random.key(1, impl="rbg"), jnp.zeros((1, 32, 32, 3)), train=False)
    variables = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), variables)
    return str(convert.save_converted(root / "converted", convert.model_spec(model, 18, None, "cifar"), variables))


def run_eval(*args):
    return subprocess.run([sys.executable, EVAL, *args], env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO,
                          capture_output=True, text=True, timeout=300)


def direct_scores(model, variables, images, labels):
    """Loss, top-1 and top-5 of ``model`` on every example at once, in NumPy (no batching, no masks)."""
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    return {"eval_loss": -log_probs[np.arange(len(labels)), labels].mean(),
            "eval_accuracy": np.mean(logits.argmax(-1) == labels),
            "eval_top5_accuracy": np.mean((top5 == labels[:, None]).any(-1)), "eval_examples": len(labels)}


def assert_scores_equal(result, expected):
    assert result["eval_examples"] == expected["eval_examples"] == 100
    for key in ("eval_loss", "eval_accuracy", "eval_top5_accuracy"):
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-5, err_msg=key)


def test_eval_of_a_workdir_equals_a_direct_computation_over_the_split(root, workdir, tmp_path):
    """Batches of 24 over 100 examples: the padded last batch counts each example once, as the direct sum."""
    output = tmp_path / "scores.json"
    proc = run_eval(f"--workdir={workdir}", "--batch_size=24", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(output.read_text())
    assert printed["step"] == 2 and printed["dataset"] == tiny_runs.TINY_DATASET

    config = trained.read_config(workdir)
    model = setup.build_model(config, num_classes=10)
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    assert_scores_equal(printed, direct_scores(model, variables, *tiny_runs.eval_split(root)))


def test_eval_of_a_workdir_equals_the_trainers_last_eval(workdir):
    """The trainer's eval event at the last step and a fresh score of that checkpoint agree."""
    loaded = trained.from_workdir(workdir)
    result = evaluation.evaluate(loaded.model, loaded.variables, loaded.config.dataset, batch_size=32,
                                 data_dir=loaded.config.data_dir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        logged = [e for e in map(json.loads, f) if "eval_loss" in e][-1]
    assert loaded.step == logged["step"] == 2
    assert result == pytest.approx({k: v for k, v in logged.items() if k != "step"}, rel=1e-6)


def test_loading_a_workdir_needs_no_optimiser_and_no_training_batch_size(workdir, monkeypatch):
    """Scoring reads params and BatchNorm statistics only: no optimiser is built, and a training batch size that
    does not split over this machine's devices (6 over 4) does not matter."""
    def no_optimiser(*args, **kwargs):
        raise AssertionError("an optimiser was built to load a model")

    monkeypatch.setattr(optim, "create_optimizer", no_optimiser)
    monkeypatch.setattr(optim, "learning_rate_schedule", no_optimiser)
    config = trained.read_config(workdir)
    config.batch_size = 6
    loaded = trained.from_workdir(workdir, config)
    assert set(loaded.variables) == {"params", "batch_stats"} and loaded.step == 2
    saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
    for a, b in zip(jax.tree.leaves(loaded.variables["params"]), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(a, b)


def test_a_config_that_does_not_fit_the_checkpoint_is_one_clear_error(workdir):
    config = trained.read_config(workdir)
    config.widths = (8, 16, 16, 32)
    with pytest.raises(checkpoints.CheckpointError, match=r"does not fit the model its config.json describes: "
                       r"batch_stats/stage4_block0/bn1/mean is \(16,\) there, the model has \(32,\); was "
                       r"config.json edited\?"):
        trained.from_workdir(workdir, config)


def test_eval_of_a_converted_checkpoint_equals_a_direct_computation(root, converted):
    proc = run_eval(f"--checkpoint={converted}", f"--dataset={tiny_runs.TINY_DATASET}",
                    f"--data_dir={tiny_runs.data_dir(root)}", "--batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["step"] is None
    assert json.loads((root / "converted" / "eval.json").read_text()) == printed
    model, variables = convert.load_converted(converted)
    assert_scores_equal(printed, direct_scores(model, variables, *tiny_runs.eval_split(root)))


@pytest.fixture(scope="module")
def untrained_workdir(root, workdir):
    """A workdir with a config but no checkpoint (a run that has not saved yet)."""
    path = root / "untrained"
    path.mkdir(exist_ok=True)
    shutil.copy(os.path.join(workdir, "config.json"), path / "config.json")
    return str(path)


@pytest.mark.parametrize("case", ["neither", "both", "no_dataset", "no_checkpoint"])
def test_bad_inputs_fail_in_one_line_with_exit_code_2(case, workdir, converted, untrained_workdir):
    """The cheap flag checks, and one error raised after the heavy imports (held-back stderr dropped)."""
    args, expected = {
        "neither": ([], "exactly one of --workdir"),
        "both": ([f"--workdir={workdir}", f"--checkpoint={converted}"], "exactly one of --workdir"),
        "no_dataset": ([f"--checkpoint={converted}"], "needs --dataset"),
        "no_checkpoint": ([f"--workdir={untrained_workdir}"], "has no checkpoint"),
    }[case]
    proc = run_eval(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: ") and expected in lines[0], proc.stderr


def test_loading_and_scoring_errors_are_the_ones_eval_py_reports_with_exit_code_2(root, workdir, converted,
                                                                                 tmp_path):
    """eval.py turns LoadError, DatasetNotPreparedError and ValueError into one line and exit code 2."""
    with pytest.raises(trained.LoadError, match="not a training workdir"):
        trained.from_workdir(str(tmp_path))
    with pytest.raises(trained.LoadError, match="not a converted checkpoint"):
        trained.from_converted(str(tmp_path))
    model, variables = convert.load_converted(converted)
    with pytest.raises(data.DatasetNotPreparedError, match="is not prepared"):
        evaluation.evaluate(model, variables, "cifar10", batch_size=8, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        evaluation.evaluate(model, variables, tiny_runs.TINY_DATASET, batch_size=10,
                            data_dir=tiny_runs.data_dir(root))


def test_evaluate_rejects_a_model_with_another_number_of_classes(root, converted):
    model, variables = convert.load_converted(converted)
    variables = {**variables, "params": {**variables["params"], "head": {
        "kernel": variables["params"]["head"]["kernel"][:, :7], "bias": variables["params"]["head"]["bias"][:7]}}}
    with pytest.raises(ValueError, match="7 outputs but .* has 10 classes"):
        evaluation.evaluate(model, variables, tiny_runs.TINY_DATASET, batch_size=8, data_dir=tiny_runs.data_dir(root))
