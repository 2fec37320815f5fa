"""Inputs a user gets wrong, and modules a user brings: one line, the right exit status, nothing on disk changed.

Each refused command is run as a user runs it (``train.py`` or the converter in a subprocess); the workdir of a
refused re-run is compared file by file (name, size, modification time) before and after. The user-defined
attention is the README's own code, extracted from README.md and trained through ``train.py``.
"""
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import tiny_runs
from attn_flax import attention, models
from attn_flax.attention import registry
from attn_flax.training import config_checks, loop, metrics, setup
from test_fault_tolerance import (ENV, REPO, committed_steps, finish, run_all, start, train_args,
                                  wait_for_checkpoint)

TINY = tiny_runs.TINY_FIELDS


def one_error_line(err: str, program: str = "train.py") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), err[-3000:]
    return lines[0]


def _write(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_VALUES = {
    "negative learning rate": (["--config.base_learning_rate=-0.1"], "base_learning_rate=-0.1 must be a number >= 0"),
    "zero steps": (["--config.num_train_steps=0"], "num_train_steps=0 must be a positive number of steps, or -1"),
    "negative steps": (["--config.num_train_steps=-5"], "num_train_steps=-5 must be"),
    "no epochs": (["--config.num_train_steps=-1", "--config.num_epochs=0"], "num_epochs=0.0 must be > 0 when num_train_steps is -1"),
    "zero batch": (["--config.batch_size=0"], "batch_size=0 must be a positive whole number"),
    "zero eval batch": (["--config.eval_batch_size=0"], "eval_batch_size=0 must be a positive"),
    "keep no checkpoint": (["--config.keep_checkpoints=0"], "keep_checkpoints=0 must be a positive"),
    "never log": (["--config.log_every_steps=0"], "log_every_steps=0 must be a positive"),
    "momentum above 1": (["--config.momentum=1.5"], "momentum=1.5 must be in [0, 1)"),
    "negative weight decay": (["--config.weight_decay=-1e-4"], "weight_decay=-0.0001 must be a number >= 0"),
    "unknown schedule": (["--config.schedule=linear"], "schedule='linear' must be one of step, cosine, constant"),
    "missing config file": (["--config=configs/nonexistent.py"], "the config file configs/nonexistent.py does not "
                                                                "exist; configs has cifar10.py"),
    "broken config file": ([lambda tmp: "--config=" + _write(tmp / "broken.py", "def get_config(:\n")],
                           "cannot be loaded (SyntaxError"),
    "bad model in the config argument, dataset not prepared": (
        ["--config=configs/cifar10.py:resnet999,cbam", "--config.dataset=cifar10"], "unknown model 'resnet999'"),
}


def test_each_bad_value_fails_in_one_line_with_exit_code_2_and_creates_nothing(tmp_path, data_dir):
    commands, workdirs = {}, {}
    for name, (extra, _) in BAD_VALUES.items():
        extra = [e(tmp_path) if callable(e) else e for e in extra]
        workdirs[name] = tmp_path / re.sub(r"\W+", "_", name)
        args = train_args(workdirs[name], data_dir, dataset=tiny_runs.TINY_DATASET)
        files = [a for a in extra if a.startswith("--config=")]
        commands[name] = args[:2] + files + args[2:] + [a for a in extra if a not in files]
    for name, (code, out, err) in run_all(commands).items():
        workdir = workdirs[name]
        assert code == 2, (name, err[-2000:])
        assert BAD_VALUES[name][1] in one_error_line(err), (name, err)
        assert out == "" and not workdir.exists(), name


def test_a_workdir_that_is_a_file_is_refused_and_left_as_it_was(tmp_path, data_dir):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    code, out, err = finish(start(train_args(path, data_dir, **TINY, num_train_steps=2)))
    assert code == 2 and "--workdir" in one_error_line(err) and "is a file, not a directory" in err
    assert path.read_text() == "my notes\n"


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A finished 2-step run and the flags that describe it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    fields = dict(TINY, num_train_steps=2, log_every_steps=2, checkpoint_every_steps=2)
    config = tiny_runs.config(data_dir, **fields)
    loop.train_and_evaluate(config, str(workdir))
    return workdir, fields


REFUSED_RERUNS = {
    "seed": ({"seed": 5}, "was made with seed=0, the config says 5"),
    "batch size": ({"batch_size": 32}, "was made with batch_size=16, the config says 32"),
    "dataset (not prepared: refused before preparing)": ({"dataset": "cifar10"}, "was made with dataset="),
    "attention": ({"attention": "se"}, "was made with attention='cbam', the config says 'se'"),
    "widths": ({"widths": (8, 16, 16, 32)}, "was made with widths=[8, 16, 16, 16]"),
}


def test_a_refused_rerun_leaves_the_workdir_untouched(finished, data_dir):
    workdir, fields = finished
    before = snapshot(workdir)
    commands = {name: train_args(workdir, data_dir, **{**fields, **change})
                for name, (change, _) in REFUSED_RERUNS.items()}
    for name, (code, out, err) in run_all(commands).items():
        assert code == 2, (name, err[-2000:])
        assert REFUSED_RERUNS[name][1] in one_error_line(err), (name, err)
        assert "use a new --workdir or the original value" in err
    assert snapshot(workdir) == before, "a refused command changed the workdir (config.json, TensorBoard, ...)"


def test_a_finished_run_says_so_exits_0_and_writes_nothing(finished, data_dir):
    workdir, fields = finished
    before = snapshot(workdir)
    code, out, err = finish(start(train_args(workdir, data_dir, **fields)))
    assert code == 0, err[-2000:]
    assert f"the run in {workdir} is finished: its checkpoint is at step 2 and the config plans 2 steps" in out
    assert "resuming" not in out and "Traceback" not in err
    assert snapshot(workdir) == before
    assert metrics.last_eval_metrics(str(workdir))["eval_examples"] == 100


def test_check_values_accepts_every_shipped_config():
    from configs import cifar10, cifar100, default, imagenet

    for config in (default.get_config(), cifar10.get_config(), cifar100.get_config(), imagenet.get_config()):
        config_checks.check_values(config)


def test_a_checkpoint_directory_replaced_by_a_file_stops_the_run_in_one_line_without_hanging(tmp_path, data_dir):
    workdir = tmp_path / "run"
    proc = start(train_args(workdir, data_dir, **TINY, num_train_steps=400, checkpoint_every_steps=5,
                            log_every_steps=5))
    wait_for_checkpoint(proc, str(workdir))
    checkpoints_dir = workdir / "checkpoints"
    subprocess.run(["rm", "-rf", str(checkpoints_dir)], check=True)
    checkpoints_dir.write_text("")
    started = time.monotonic()
    code, out, err = finish(proc, timeout=120)
    assert code == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0].split("train.py: error:", 1)[1]), err[-3000:]
    assert f"{checkpoints_dir} is no longer a directory" in errors[0]
    print(f"stopped {time.monotonic() - started:.1f} s after the directory was replaced")


def test_a_checkpoint_directory_removed_during_the_run_is_recreated_with_a_warning(tmp_path, data_dir):
    workdir = tmp_path / "run"
    proc = start(train_args(workdir, data_dir, **TINY, num_train_steps=60, checkpoint_every_steps=20,
                            log_every_steps=5))
    wait_for_checkpoint(proc, str(workdir))
    subprocess.run(["rm", "-rf", str(workdir / "checkpoints")], check=True)
    code, out, err = finish(proc)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert f"the checkpoint directory {workdir / 'checkpoints'} was removed during the run" in err
    assert committed_steps(str(workdir)) == [40, 60]


def run_converter(*args):
    return subprocess.run([sys.executable, "-m", "attn_flax.convert", *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_converter_reports_a_missing_or_truncated_checkpoint_in_one_line(tmp_path):
    proc = run_converter(f"--checkpoint={tmp_path / 'missing.pth.tar'}", "--depth=18", f"--output={tmp_path / 'o'}")
    assert proc.returncode == 2
    assert "missing.pth.tar does not exist" in one_error_line(proc.stderr, "python -m attn_flax.convert")
    torch = pytest.importorskip("torch")
    whole = tmp_path / "whole.pth.tar"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, whole)
    data = whole.read_bytes()
    (tmp_path / "truncated.pth.tar").write_bytes(data[: len(data) // 2])
    proc = run_converter(f"--checkpoint={tmp_path / 'truncated.pth.tar'}", "--depth=18",
                         f"--output={tmp_path / 'o'}")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr, "python -m attn_flax.convert")
    assert "cannot be read as a PyTorch checkpoint" in line and "truncated" in line
    assert not (tmp_path / "o").exists()


# --- a user's own attention -------------------------------------------------------------------------------------

def readme_file(name: str) -> str:
    """The README's code block whose first line is ``# NAME...``."""
    readme = (pathlib.Path(REPO) / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S):
        if block.startswith(f"# {name}"):
            return block
    raise AssertionError(f"README.md has no python block starting with '# {name}'")


def readme_commands(marker: str) -> list[str]:
    readme = (pathlib.Path(REPO) / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) for line in block.splitlines()
            if marker in line]


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder outside the package with the README's my_gates.py and my_config.py; the registry restored after."""
    (tmp_path / "my_gates.py").write_text(readme_file("my_gates.py"))
    (tmp_path / "my_config.py").write_text(readme_file("my_config.py"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return tmp_path


def test_the_readmes_own_attention_trains_with_train_py_and_evaluates(user_folder, data_dir):
    commands = readme_commands("--workdir=/tmp/my_gate")
    assert [c.split()[:3] for c in commands] == [["PYTHONPATH=.", "python", "train.py"],
                                                 ["PYTHONPATH=.", "python", "eval.py"]], commands
    env = {**ENV, "PYTHONPATH": str(user_folder)}
    workdir = user_folder / "run"
    train = commands[0].split()[2:]
    args = [sys.executable, os.path.join(REPO, train[0]), *[a for a in train[1:] if not a.startswith("--workdir")],
            f"--workdir={workdir}", f"--config.data_dir={data_dir}",
            *(f"--config.{k}={'(' + ','.join(map(str, v)) + ')' if isinstance(v, tuple) else v}"
              for k, v in dict(TINY, num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2).items())]
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert committed_steps(str(workdir)) == [2]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), f"--workdir={workdir}"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"eval_examples": 100' in proc.stdout


def test_the_readmes_own_test_of_its_attention_passes(user_folder):
    (user_folder / "test_my_gates.py").write_text(readme_file("test_my_gates.py"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_gates.py"],
                          env={**ENV, "PYTHONPATH": str(user_folder)}, cwd=user_folder, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_readmes_own_attention_takes_its_option_from_a_config_file(user_folder):
    sys.path.insert(0, str(user_folder))
    try:
        import importlib

        my_config = importlib.import_module("my_config")
        config = my_config.get_config()
        model = setup.build_model(config, num_classes=10)
        assert dict(model.attention.options) == {"scale": 2.0}
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
        assert params["params"]["stage1_block0"]["attention"]["w"].shape == (16,)
    finally:
        sys.path.remove(str(user_folder))
        for name in ("my_gates", "my_config"):
            sys.modules.pop(name, None)


def test_an_entry_point_names_an_attention_of_an_installed_package(tmp_path, monkeypatch):
    (tmp_path / "my_gates.py").write_text(readme_file("my_gates.py"))
    info = tmp_path / "my_gates-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-gates\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[attn_flax.attention]\nscaled_gate = my_gates:ScaledGate\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    try:
        assert "scaled_gate" in attention.available()
        model = models.create_model("resnet18", num_classes=10, attention="scaled_gate", stem="cifar", scale=3.0)
        assert model.attention.placement == "block" and dict(model.attention.options) == {"scale": 3.0}
    finally:
        sys.modules.pop("my_gates", None)


def test_register_checks_the_contract_and_networks_pass_dtypes_only_to_modules_that_declare_them(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class NoTrain(nn.Module):
        def __call__(self, x):
            return x

    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return x * nn.sigmoid(self.param("w", nn.initializers.zeros, (x.shape[-1],))).astype(x.dtype)

    with pytest.raises(ValueError, match=r"NoTrain.__call__ must take the keyword argument `train`"):
        attention.register("no_train", NoTrain, placement="block")
    with pytest.raises(ValueError, match="is not a flax.linen.Module subclass"):
        attention.register("a_function", lambda x, train: x, placement="block")
    attention.register("bare", Bare, placement="stage")
    with pytest.raises(ValueError, match="takes no option 'reduction'; it declares no options"):
        attention.factory("bare", reduction=4)
    model = models.create_model("resnet18", num_classes=10, attention="bare", stem="cifar", dtype=jnp.bfloat16,
                                bn_group_size=2).clone(widths=(8, 8, 8, 8), stage_sizes=(1, 1, 1, 1))
    x = jnp.ones((4, 16, 16, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(variables["params"]) >= {"stage1_attention", "stage2_attention", "stage3_attention"}
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


def test_an_import_path_that_does_not_resolve_fails_in_one_clear_line(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match=r"cannot import 'no_such_package.gates' .*PYTHONPATH"):
        models.create_model("resnet18", num_classes=10, attention="no_such_package.gates:Gate")
    with pytest.raises(ValueError, match=r"module 'attn_flax.attention.cbam' has no attribute 'Nope'"):
        models.create_model("resnet18", num_classes=10, attention="attn_flax.attention.cbam:Nope")
    model = models.create_model("resnet18", num_classes=10, attention="attn_flax.attention.cbam:CBAM")
    assert model.attention.placement == "block"
