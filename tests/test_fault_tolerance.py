"""What a run survives: kill -9 at a random moment, SIGTERM, damaged checkpoints, NaN, bad configs, a dead peer.

Most tests run ``train.py`` in subprocesses on the tiny model and the tiny offline dataset, as a user would; the
exact-resume tests compare final parameters bit for bit with an uninterrupted run of the same config (a cosine
schedule, so the learning rate depends on the planned length and a resumed run must plan the same length).
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attn_flax.training import checkpoints, loop, nan_guard
import tiny_runs
from conftest import free_port
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATASET = tiny_runs.TINY_DATASET
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
       "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".jax_cache"), "PYTHONUNBUFFERED": "1",
       "TF_CPP_MIN_LOG_LEVEL": "2"}
TINY = tiny_runs.TINY_FIELDS
# The resumed runs: a cosine schedule with warmup over 40 steps, a checkpoint every 5.
LONG = dict(TINY, num_train_steps=40, log_every_steps=5, checkpoint_every_steps=5)


def config_of(data_dir, **fields):
    config = default.get_config()
    config.update(dict(data_dir=data_dir, **fields))
    return config


def flag_value(value):
    return "(" + ",".join(map(str, value)) + ")" if isinstance(value, tuple) else str(value)


def train_args(workdir, data_dir, **fields):
    return [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
            f"--config.data_dir={data_dir}", *(f"--config.{k}={flag_value(v)}" for k, v in fields.items())]


def start(args, **kwargs):
    return subprocess.Popen(args, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


def run_all(commands: dict[str, list[str]], parallel: int = 2) -> dict[str, tuple[int, str, str]]:
    """Runs the commands ``parallel`` at a time (each start-up imports TensorFlow and JAX: ~8 CPU-seconds, so
    starting a dozen at once on a loaded 2-core machine exceeds any sensible timeout) and returns
    (exit status, stdout, stderr) by name."""
    results, running, waiting = {}, {}, list(commands.items())
    while waiting or running:
        while waiting and len(running) < parallel:
            name, args = waiting.pop(0)
            running[name] = start(args)
        name = next(iter(running))
        results[name] = finish(running.pop(name))
    return results


def committed_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def wait_for_checkpoint(proc, workdir, timeout=240):
    """Waits until the run has committed a checkpoint (so it is past start-up and inside the loop)."""
    deadline = time.monotonic() + timeout
    while not committed_steps(workdir):
        assert proc.poll() is None, f"the run ended early: {finish(proc)}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def params_at(workdir, step):
    restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return restored["params"]


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """Final parameters of the LONG run, never interrupted."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    loop.train_and_evaluate(config_of(data_dir, **LONG), workdir)
    return params_at(workdir, LONG["num_train_steps"])


def test_kill_9_at_a_random_moment_then_restart_equals_uninterrupted(tmp_path, data_dir, uninterrupted):
    """SIGKILL at a random moment after the first checkpoint (possibly mid-save), restart: same final
    parameters as the uninterrupted run, bit for bit; an uncommitted save left behind is removed, not read."""
    workdir = str(tmp_path / "run")
    proc = start(train_args(workdir, data_dir, **LONG))
    wait_for_checkpoint(proc, workdir)
    delay = random.Random().uniform(0.0, 1.5)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before the kill; lengthen LONG"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resume_step = committed_steps(workdir)[-1]
    assert resume_step < LONG["num_train_steps"]
    # A save cut short leaves only a temporary directory; plant one to be sure the restart copes with it.
    leftover = os.path.join(workdir, "checkpoints", f"{resume_step + 5}.orbax-checkpoint-tmp-1234567890")
    os.makedirs(os.path.join(leftover, "state"), exist_ok=True)
    with open(os.path.join(leftover, "state", "_METADATA"), "w") as f:
        f.write("{partial")

    code, out, err = finish(start(train_args(workdir, data_dir, **LONG)))
    assert code == 0, err[-3000:]
    assert f"resuming from the checkpoint at step {resume_step}" in out, (delay, out)
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert_same_params(params_at(workdir, LONG["num_train_steps"]), uninterrupted)


def test_sigterm_saves_at_the_current_step_exits_0_and_the_restart_continues(tmp_path, data_dir, uninterrupted):
    workdir = str(tmp_path / "run")
    proc = start(train_args(workdir, data_dir, **LONG))
    wait_for_checkpoint(proc, workdir)
    time.sleep(random.Random().uniform(0.0, 1.0))
    assert proc.poll() is None
    periodic = committed_steps(workdir)[-1]
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, out, err = finish(proc, timeout=60)
    seconds = time.monotonic() - sent
    print(f"SIGTERM to exit: {seconds:.2f} s")
    assert code == 0, err[-3000:]
    assert seconds < 30, "a typical grace period is 30 s"
    saved = int(re.search(r"preempted: saved a checkpoint at step (\d+)", out).group(1))
    assert periodic <= saved < LONG["num_train_steps"] and committed_steps(workdir)[-1] == saved

    code, out, err = finish(start(train_args(workdir, data_dir, **LONG)))
    assert code == 0, err[-3000:]
    assert f"resuming from the checkpoint at step {saved}" in out
    assert_same_params(params_at(workdir, LONG["num_train_steps"]), uninterrupted)


def test_damaged_checkpoints_are_moved_aside_and_the_run_continues_from_the_last_good_one(
        tmp_path, data_dir, caplog, capsys):
    """Checkpoint 6 full of garbage and checkpoint 4 without its state: the run warns, resumes from 2, keeps
    both damaged ones in checkpoints_damaged/, saves 4 and 6 anew, and ends as an uninterrupted run."""
    short = dict(TINY, schedule="constant", warmup_epochs=0.0, log_every_steps=2, checkpoint_every_steps=2)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config_of(data_dir, **short, num_train_steps=6), workdir)
    assert committed_steps(workdir) == [2, 4, 6]
    state_6 = os.path.join(workdir, "checkpoints", "6", "state")
    for root, _, files in os.walk(state_6):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    os.rename(os.path.join(workdir, "checkpoints", "4", "state"), os.path.join(workdir, "checkpoints", "4", "gone"))
    capsys.readouterr()

    loop.train_and_evaluate(config_of(data_dir, **short, num_train_steps=8), workdir)
    assert "resuming from the checkpoint at step 2" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 2 and "checkpoint 6" in warnings[0] and "checkpoint 4" in warnings[1], warnings
    damaged = sorted(os.listdir(os.path.join(workdir, checkpoints.DAMAGED)))
    assert [d.split("-")[0] for d in damaged] == ["4", "6"]
    with open(os.path.join(workdir, checkpoints.DAMAGED, damaged[1], "state", "_METADATA"), "rb") as f:
        assert f.read() == b"garbage", "the damaged checkpoint is kept as it was"
    assert committed_steps(workdir) == [4, 6, 8]

    reference = str(tmp_path / "uninterrupted")
    loop.train_and_evaluate(config_of(data_dir, **short, num_train_steps=8), reference)
    assert_same_params(params_at(workdir, 8), params_at(reference, 8))


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    """Learning rate 1e5: the loss becomes NaN within a few steps; the run exits 1 with one error line naming
    the step, and every checkpoint left is from before that step and finite."""
    workdir = str(tmp_path / "run")
    code, _, err = finish(start(train_args(
        workdir, data_dir, **dict(TINY, base_learning_rate=1e5, schedule="constant", warmup_epochs=0.0,
                                  num_train_steps=12, log_every_steps=1, checkpoint_every_steps=2))))
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    match = re.match(r"train\.py: error: .* at step (\d+) \(", last)
    assert match and ("not finite" in last or re.search(r"loss is (nan|inf|-inf)", last)), last
    bad_step = int(match.group(1))
    kept = committed_steps(workdir)
    assert kept and kept[-1] < bad_step, (kept, last)
    assert f"the checkpoint at step {kept[-1]} is kept" in last and "lower the learning rate (6.25e+03 at that step)" in last, last
    for leaf in jax.tree.leaves(params_at(workdir, kept[-1])):
        assert np.all(np.isfinite(leaf))


def test_the_non_finite_message_is_true_without_a_checkpoint_and_at_a_small_learning_rate():
    from attn_flax.training.state import TrainState

    params = {"stage1_block0": {"conv1": {"kernel": np.ones(3)}, "bn1": {"scale": np.array([1.0, np.nan])}}}
    state = TrainState(step=np.int32(3), params=params, batch_stats={}, opt_state=(), rng=np.zeros(2, np.uint32))
    message = str(nan_guard.non_finite_error("the training loss is nan", 3, state, 0.0, None))
    assert "first non-finite leaf params/stage1_block0/bn1/scale" in message
    assert "no checkpoint had been saved yet" in message and "kept" not in message
    assert "lower the learning rate" not in message and "only 0" in message
    finite = state.replace(params={"head": {"bias": np.zeros(2)}})
    message = str(nan_guard.non_finite_error("the training loss is inf", 9, finite, 0.4, 8))
    assert "still finite" in message and "the checkpoint at step 8 is kept" in message
    assert "lower the learning rate (0.4 at that step)" in message and "\n" not in message


def _option_config(tmp_path):
    path = tmp_path / "bad_option.py"
    path.write_text("from configs import default\n\n\ndef get_config():\n    config = default.get_config()\n"
                    "    config.attention_options.reductio = 8\n    return config\n")
    return f"--config={path}"


BAD_CONFIGS = {
    "unknown model": (["--config.model=resnet19"], "unknown model 'resnet19'"),
    "unknown attention": (["--config.attention=cbamm"], "unknown attention 'cbamm'"),
    "unknown attention option": ([_option_config], "takes no option 'reductio'"),
    "unknown config field": (["--config.batch_sizee=32"], "no field 'batch_sizee'"),
    "unknown dataset": (["--config.dataset=imagenet2013"], "unknown dataset 'imagenet2013'"),
    "dataset not prepared": (["--config.dataset=cifar10"], "python -m attn_flax.data.prepare cifar10"),
    "batch size vs devices": (["--config.batch_size=18"], "divisible by the number of devices (4)"),
}


def test_each_bad_config_fails_in_one_line_with_exit_code_2_before_compiling(tmp_path, data_dir):
    """Each case prints one line that says what is wrong and what to do and creates no workdir (nothing was
    compiled or trained)."""
    empty_data_dir = str(tmp_path / "empty_tfds")
    os.makedirs(empty_data_dir)
    commands = {}
    for name, (extra, _) in BAD_CONFIGS.items():
        extra = [e(tmp_path) if callable(e) else e for e in extra]
        args = train_args(tmp_path / name.replace(" ", "_"),
                          empty_data_dir if name == "dataset not prepared" else data_dir, dataset=TINY_DATASET)
        files = [a for a in extra if a.startswith("--config=")]
        overrides = [a for a in extra if a not in files]
        commands[name] = args[:2] + files + args[2:] + overrides  # the last flag wins
    for name, (code, out, err) in run_all(commands).items():
        lines = err.strip().splitlines()
        assert code == 2, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), (name, err[-2000:])
        assert BAD_CONFIGS[name][1] in lines[0], (name, lines[0])
        assert out == ""
        assert not (tmp_path / name.replace(" ", "_")).exists(), "nothing ran"


@pytest.mark.heavy
@pytest.mark.xdist_group("multi_process")
def test_a_process_killed_in_a_two_process_run_makes_the_other_exit(tmp_path, data_dir):
    """Process 1 of 2 is killed mid-run; process 0 exits with an error within about the heartbeat timeout
    instead of waiting forever in a collective, and the checkpoints already saved stay."""
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = free_port()
    workdir = str(tmp_path / "run")
    args = train_args(workdir, data_dir, **dict(TINY, eval_batch_size=24, num_train_steps=400, log_every_steps=1,
                                                 checkpoint_every_steps=2))
    args += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--heartbeat_timeout_seconds=10"]
    procs = [subprocess.Popen(args + [f"--process_id={i}"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        wait_for_checkpoint(procs[0], workdir, timeout=400)
        assert procs[1].poll() is None
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"survivor exited {seconds:.1f} s after its peer was killed, status {procs[0].returncode}")
    assert procs[0].returncode != 0
    assert "heartbeat" in err or "distributed service detected fatal errors" in err, err[-3000:]
    assert committed_steps(workdir)


ONE_HOST_CANNOT_READ = """
import os, runpy, sys
from attn_flax.training import checkpoints
check_readable = checkpoints.check_readable
def cannot_read(step_dir):
    if step_dir.name == os.environ.get("UNREADABLE_STEP"):
        raise OSError("simulated: this host cannot read it")
    return check_readable(step_dir)
checkpoints.check_readable = cannot_read
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""Runs train.py (argv[1:]) with step $UNREADABLE_STEP unreadable for this process only."""


@pytest.mark.heavy
@pytest.mark.xdist_group("multi_process")
def test_processes_that_disagree_on_the_newest_readable_checkpoint_restore_the_newest_all_can_read(
        tmp_path, data_dir):
    """Checkpoints 2 and 4; process 1 of 2 cannot read 4: both processes resume from 2 (not 4 and 2), 4 is moved
    aside, saved anew, and the run finishes."""
    short = dict(TINY, schedule="constant", warmup_epochs=0.0, log_every_steps=2, checkpoint_every_steps=2,
                 eval_batch_size=24)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config_of(data_dir, **short, num_train_steps=4), workdir)
    assert committed_steps(workdir) == [2, 4]
    args = [sys.executable, "-c", ONE_HOST_CANNOT_READ, *train_args(workdir, data_dir, **short, num_train_steps=6)[1:],
            f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(args + [f"--process_id={i}"], env={**env, "UNREADABLE_STEP": "4" if i else ""},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        (out_0, err_0), (_, err_1) = [p.communicate(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], err_0[-3000:] + err_1[-3000:]
    assert "resuming from the checkpoint at step 2" in out_0
    assert re.search(r"checkpoint 4 in \S+ cannot be restored \(OSError: simulated", err_1), err_1[-3000:]
    assert re.search(r"checkpoint 4 in \S+ cannot be read by every process of the run; all of them restore step 2",
                     err_0), err_0[-3000:]
    assert [d.split("-")[0] for d in os.listdir(os.path.join(workdir, checkpoints.DAMAGED))] == ["4"]
    assert committed_steps(workdir) == [2, 4, 6]
