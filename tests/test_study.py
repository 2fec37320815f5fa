"""study.py: a grid of train.py runs over seeds, continued after an interruption, and its report.

The end-to-end test runs the tool as a user does (subprocesses) on the tiny model and dataset: 2 variants x 2
seeds x 4 steps, one run finished and one interrupted beforehand (made in-process, where the compilation cache
is warm). The report's arithmetic is checked on fabricated metrics against numbers computed independently
(scipy's Welch test, written down), and the t quantile against a printed table.
"""
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest

import tiny_runs
from attn_flax.study import report, stats, sweep
from attn_flax.training import loop, metrics
from test_fault_tolerance import ENV, REPO, finish, flag_value, start

STUDY = [sys.executable, os.path.join(REPO, "study.py")]
CONFIG = os.path.join(REPO, "configs", "default.py")


def tiny_overrides(data_dir: str) -> list[str]:
    fields = dict(tiny_runs.TINY_FIELDS, data_dir=data_dir, num_train_steps=4, log_every_steps=2,
                  checkpoint_every_steps=2)
    return [f"--config.{k}={flag_value(v)}" for k, v in fields.items()]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("study.py: error: "), err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------- the tool


def _plan_one_variant_repeatedly(study_dir: str, index: int, times: int) -> None:
    run = types.SimpleNamespace(workdir=os.path.join(study_dir, f"attention=v{index}", "seed=0"), variant=f"v{index}",
                                seed=0, total_steps=10, config=types.SimpleNamespace(attention=f"v{index}"), args=[])
    for _ in range(times):
        sweep.write_plan(study_dir, [run], ["study.py", "run", f"--sweep=attention=v{index}"], "python", "train.py")


def test_invocations_side_by_side_each_add_their_runs_to_the_plan(tmp_path):
    """One `study.py run` per variant, all started at once into one directory (how a machine with room for
    several runs, or a scheduler's array job, runs a grid): study.json ends with every invocation's runs."""
    processes = [multiprocessing.get_context("fork").Process(target=_plan_one_variant_repeatedly,
                                                              args=(str(tmp_path), i, 25)) for i in range(8)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    assert [p.exitcode for p in processes] == [0] * 8
    with open(tmp_path / sweep.PLAN_FILE) as f:
        study = json.load(f)
    assert sorted(study["runs"]) == [f"attention=v{i}/seed=0" for i in range(8)]
    assert len(study["invocations"]) == 8
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.heavy
@pytest.mark.xdist_group("multi_process")
def test_a_tiny_sweep_runs_resumes_skips_and_reports(tmp_path, data_dir):
    """2 variants x 2 seeds: the dry run prints the 4 commands the run then uses; a finished run is skipped, an
    interrupted one resumes from its checkpoint, the others start; the report counts 2 seeds per variant."""
    study = tmp_path / "study"
    args = [*STUDY, "run", f"--workdir={study}", f"--config={CONFIG}", "--sweep=attention=none,se", "--seeds=0,1",
            *tiny_overrides(data_dir)]
    dry = start(args + ["--dry_run"])

    runs = sweep.plan(str(study), CONFIG, tiny_overrides(data_dir), [sweep.parse_sweep("attention=none,se")], (0, 1))
    by_name = {r.name: r for r in runs}
    assert list(by_name) == ["attention=none/seed=0", "attention=none/seed=1", "attention=se/seed=0",
                             "attention=se/seed=1"]
    finished, interrupted = by_name["attention=none/seed=1"], by_name["attention=none/seed=0"]
    loop.train_and_evaluate(finished.config, finished.workdir)
    loop.train_and_evaluate(interrupted.config, interrupted.workdir)  # then as if killed after step 2's checkpoint
    subprocess.run(["rm", "-rf", os.path.join(interrupted.workdir, "checkpoints", "4")], check=True)
    kept = [e for e in metrics.read_metrics(interrupted.workdir) if e["step"] <= 2]
    with open(os.path.join(interrupted.workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in kept)
    untouched = {name: os.stat(os.path.join(finished.workdir, name)).st_mtime_ns
                 for name in ("metrics.jsonl", "config.json")}

    code, out, err = finish(dry)
    assert code == 0, err[-3000:]
    commands = out.strip().splitlines()
    assert len(commands) == 4
    for line, run in zip(commands, runs):  # train.py as a path relative to the study's directory (REPO)
        python, script, *train_args = shlex.split(line)
        assert (python, os.path.join(REPO, script), train_args) == (sys.executable, os.path.join(REPO, "train.py"),
                                                                    list(run.args))
    assert sorted(os.listdir(study)) == ["attention=none", sweep.PLAN_FILE, sweep.LOCK_FILE], "a dry run runs nothing"

    code, out, err = finish(start(args), timeout=600)
    assert code == 0, (out, err[-3000:])
    assert out.splitlines() == [
        "[1/4] attention=none/seed=0: resuming at step 2 of 4",
        out.splitlines()[1],
        "[2/4] attention=none/seed=1: finished (4 steps), skipped",
        "[3/4] attention=se/seed=0: starting, 4 steps",
        out.splitlines()[4],
        "[4/4] attention=se/seed=1: starting, 4 steps",
        out.splitlines()[6]], out
    assert all(" done in " in out.splitlines()[i] for i in (1, 4, 6)), out
    log = (study / "attention=none" / "seed=0" / sweep.LOG_FILE).read_text()
    assert f"$ {subprocess.list2cmdline([sys.executable, 'train.py', *interrupted.args])}" in log
    assert "resuming from the checkpoint at step 2" in log
    assert [e["step"] for e in metrics.read_metrics(interrupted.workdir) if "train_loss" in e] == [2, 4]
    assert not os.path.exists(os.path.join(finished.workdir, sweep.LOG_FILE)), "the finished run was not started"
    assert untouched == {name: os.stat(os.path.join(finished.workdir, name)).st_mtime_ns for name in untouched}
    for run in runs:
        assert metrics.last_eval_metrics(run.workdir)["eval_examples"] == 100, run.name

    md, png = report.write_report(str(study))
    rows = [line for line in open(md).read().splitlines() if line.startswith("| attention=")]
    assert [row.split(" | ")[:2] for row in rows] == [["| attention=none", "2"], ["| attention=se", "2"]]
    assert "(baseline)" in rows[0] and os.path.getsize(png) > 10_000


def test_bad_input_fails_in_one_line_before_any_run_starts(tmp_path, data_dir):
    """A value the second combination's module rejects stops the sweep before the first runs; bad --sweep
    syntax and unknown fields likewise; nothing is written."""
    cases = {
        "module rejects a swept value": (["--sweep=attention=cbam", "--sweep=attention_options.order=channel_first,sideways"],
                                         "--config.attention=cbam --config.attention_options.order=sideways: "),
        "bad sweep syntax": (["--sweep=attention"], "--sweep=attention: give --sweep=KEY=V1,V2,..."),
    }
    procs = {name: start([*STUDY, "run", f"--workdir={tmp_path / str(i)}", *extra, *tiny_overrides(data_dir)])
             for i, (name, (extra, _)) in enumerate(cases.items())}
    for i, (name, proc) in enumerate(procs.items()):
        code, out, err = finish(proc)
        assert code == 2 and out == "", (name, err[-2000:])
        assert cases[name][1] in one_error_line(err), (name, err)
        assert not (tmp_path / str(i)).exists(), name


@pytest.mark.parametrize("extra, message", [
    (dict(overrides=["--config.attention_options.kernl_size=3"]),
     "the config has no field 'kernl_size' (Did you mean \"kernel_size\""),
    (dict(sweeps=["attention=none,sse"]), "--config.attention=sse: unknown attention 'sse'"),
    (dict(sweeps=["momentum=0.9,x"]), "--config.momentum=x: flag --config.momentum=x: "),
    (dict(sweeps=["base_learning_rate=0.1,-1"]), "base_learning_rate=-1.0 must be a number >= 0"),
    (dict(sweeps=["attention=bam", "attention_options.combine=sum,sum"]), "a value is given twice"),
    (dict(sweeps=["attention=none,cbam", "attention_options.order=parallel"]),
     "--config.attention=none --config.attention_options.order=parallel: "),
    (dict(sweeps=["attention=se"], overrides=["--config.attention=cbam"]), "also set by --config.attention"),
    (dict(sweeps=["attention_options.pool_types=(avg,max)"]), "pool_types ('(avg,max)',) must be"),
    (dict(sweeps=["seed=1,2"]), "give the seeds with --seeds"),
    (dict(overrides=["--config.seed=3"]), "give the seeds with --seeds"),
    (dict(overrides=["--config.attention"]), "give --config.KEY=VALUE"),
    (dict(sweeps=["attention_options.pool_types=('avg',"]), "unbalanced brackets"),
])
def test_each_bad_combination_is_named_in_one_line(tmp_path, data_dir, extra, message):
    with pytest.raises(sweep.StudyError) as err:
        sweeps = [sweep.parse_sweep(s) for s in extra.get("sweeps", [])]
        sweep.plan(str(tmp_path / "s"), CONFIG, sweep.parse_overrides(tiny_overrides(data_dir) + extra.get("overrides", [])),
                   sweeps, (0,))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "s").exists()


def test_seeds_are_distinct_whole_numbers():
    assert sweep.parse_seeds(["0", "1", "2"]) == (0, 1, 2)
    for bad in (["0", "0"], ["-1"], ["a"], []):
        with pytest.raises(sweep.StudyError, match="--seeds"):
            sweep.parse_seeds(bad)


def test_sweep_values_split_at_top_level_commas_only():
    assert sweep.split_values("('avg',),('max',),('avg','max')") == ["('avg',)", "('max',)", "('avg','max')"]
    assert sweep.split_values("a, 'x,y' ,[1,(2,3)]") == ["a", "'x,y'", "[1,(2,3)]"]
    assert sweep.parse_sweep("config.attention_options.order=channel_first,parallel") == sweep.Sweep(
        "attention_options.order", ("channel_first", "parallel"))


def test_run_directories_name_the_swept_values_as_the_config_reads_them(tmp_path, data_dir):
    sweeps = [sweep.parse_sweep("attention=cbam"), sweep.parse_sweep("attention_options.pool_types=('avg',),('avg','max')"),
              sweep.parse_sweep("attention_options.spatial=true,False")]
    runs = sweep.plan(str(tmp_path), CONFIG, tiny_overrides(data_dir), sweeps, (3,))
    assert [r.name for r in runs] == ["attention=cbam,pool_types=avg,spatial=True/seed=3",
                                      "attention=cbam,pool_types=avg,spatial=False/seed=3",
                                      "attention=cbam,pool_types=avg+max,spatial=True/seed=3",
                                      "attention=cbam,pool_types=avg+max,spatial=False/seed=3"]
    assert [r.total_steps for r in runs] == [4] * 4 and runs[0].workdir == str(tmp_path / runs[0].name)


def test_a_run_made_with_another_config_is_refused_by_name(tmp_path, data_dir):
    """A sweep continued with another shared value (here the learning rate, which train.py itself would accept
    on resume) would mix two studies in one table: refused, naming the run and the field."""
    run = sweep.plan(str(tmp_path), CONFIG, tiny_overrides(data_dir), [], (0,))[0]
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
        f.write(run.config.to_json_best_effort())
    changed = tiny_overrides(data_dir) + ["--config.base_learning_rate=0.1"]
    with pytest.raises(sweep.StudyError, match=r"base/seed=0 was run with base_learning_rate=0.4, this sweep says 0.1"):
        sweep.plan(str(tmp_path), CONFIG, changed, [], (0,))
    moved = [a for a in tiny_overrides(data_dir) if not a.startswith("--config.data_dir=")]
    assert sweep.plan(str(tmp_path), CONFIG, moved + [f"--config.data_dir={data_dir}/."], [], (0,))


def test_sigterm_stops_the_sweep_after_the_running_run_saved(tmp_path):
    """SIGTERM to the study reaches the running train.py (which saves and exits 0); the sweep stops there with
    exit 0, and the next run is not started."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(textwrap.dedent("""
        import pathlib, signal, sys, time
        out = pathlib.Path(sys.argv[-1].split("=", 1)[1])
        signal.signal(signal.SIGTERM, lambda *_: (out.joinpath("got_sigterm").touch(), sys.exit(0)))
        out.joinpath("started").touch()
        time.sleep(60)
    """))
    runs = [sweep.PlannedRun(f"v{i}", 0, str(tmp_path / f"v{i}"), (f"--workdir={tmp_path / f'v{i}'}",), None, 10, 0)
            for i in range(2)]
    said = []
    timer = threading.Thread(target=lambda: (_wait_for(tmp_path / "v0" / "started"), os.kill(os.getpid(), signal.SIGTERM)))
    timer.start()
    code = sweep.execute(runs, sys.executable, str(fake), say=said.append)
    timer.join()
    assert code == 0 and (tmp_path / "v0" / "got_sigterm").exists() and not (tmp_path / "v1").exists()
    assert said[-1] == "[1/2] v0/seed=0: stopped at step 0 of 10; run the same command to continue"
    assert json.loads((tmp_path / "v0" / sweep.ATTEMPTS_FILE).read_text())["returncode"] == 0


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------- the report


T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423, 120: 1.9799}
"""Student's t, 0.975 quantile, from a printed table (4 decimals)."""


def test_t_quantile_matches_the_printed_table():
    for df, value in T_975.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=6e-5), df
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=6e-5)
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)


def test_t_quantile_matches_scipy_at_fractional_degrees_of_freedom():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.0, 1.3, 2.5, 3.4845, 7.9, 61.2):
        for p in (0.9, 0.975, 0.995):
            assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-8), (p, df)


def _fake_run(study, path, accuracy, loss, total=100, last_step=100, attempts=None):
    workdir = study / path
    workdir.mkdir(parents=True)
    events = [{"step": 50, "train_loss": 1.0, "steps_per_second": 5.0, "first_step_seconds": 2.0},
              {"step": 50, "eval_accuracy": accuracy - 0.1, "eval_loss": loss + 1},
              {"step": 100, "train_loss": 0.5, "steps_per_second": 10.0},
              {"step": last_step, "eval_accuracy": accuracy, "eval_loss": loss}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if attempts:
        (workdir / sweep.ATTEMPTS_FILE).write_text("".join(json.dumps({"seconds": s}) + "\n" for s in attempts))
    return path, total


def test_report_arithmetic_on_fixed_numbers(tmp_path):
    """Means, sample standard deviations and Welch intervals as scipy.stats.ttest_ind(equal_var=False) gives them
    (written down here); unfinished runs are listed, not counted; times measured or estimated."""
    study = tmp_path / "study"
    plan = {}
    cases = [("attention=none", "none", [(0.80, 0.6), (0.82, 0.5), (0.84, 0.4)], None),
             ("attention=cbam", "cbam", [(0.85, 0.3), (0.88, 0.3), (0.91, 0.3)], [[60], [30, 60], [90]]),
             ("attention=se", "se", [(0.79, 0.5), (0.83, 0.5), (0.99, 0.1)], [[60]] * 3),
             ("attention=eca", "eca", [(0.81, 0.45)], [[60]])]
    for variant, attention, values, attempts in cases:
        for seed, (accuracy, loss) in enumerate(values):
            unfinished = attention == "se" and seed == 2
            path, total = _fake_run(study, f"{variant}/seed={seed}", accuracy, loss, last_step=50 if unfinished else 100,
                                    attempts=attempts[seed] if attempts else None)
            plan[path] = {"variant": variant, "seed": seed, "total_steps": total, "attention": attention}
    plan["attention=eca/seed=1"] = {"variant": "attention=eca", "seed": 1, "total_steps": 100, "attention": "eca"}
    (study / sweep.PLAN_FILE).write_text(json.dumps({"invocations": [{"argv": ["study.py", "run", "--seeds=0,1,2"]}],
                                                     "runs": plan}))
    md, png = report.write_report(str(study))
    text = open(md).read()
    rows = [line for line in text.splitlines() if line.startswith("| attention=")]
    assert rows == [
        "| attention=none | 3 | 82.00 ± 2.00 | (baseline) | 0.5000 ± 0.1000 | 100 | ~17 s |",
        "| attention=cbam | 3 | 88.00 ± 3.00 | +6.00 [-0.13, +12.13] | 0.3000 ± 0.0000 | 100 | 1.3 min |",
        "| attention=se | 2 | 81.00 ± 2.83 | -1.00 [-12.95, +10.95] | 0.5000 ± 0.0000 | 100 | 1.0 min |",
        "| attention=eca | 1 | 81.00 | n/a (n < 2) | 0.4500 | 100 | 1.0 min |",
    ]
    assert "Welch's two-sided 95% t interval" in text
    assert "Not in the table (2 unfinished" in text
    assert "attention=se/seed=2 (last eval at step 50 of 100)" in text and "attention=eca/seed=1 (last eval at step -" in text
    assert "Compute: 11 runs planned, 9 finished, ~8.8 min in all" in text and "study.py run --seeds=0,1,2" in text
    assert os.path.getsize(png) > 10_000

    report.write_report(str(study), baseline="attention=cbam")
    assert "| attention=none | 3 | 82.00 ± 2.00 | -6.00 [-12.13, +0.13] |" in open(md).read()
    with pytest.raises(sweep.StudyError, match="--baseline=x: no finished variant"):
        report.write_report(str(study), baseline="x")
    with pytest.raises(sweep.StudyError, match="has no study.json"):
        report.write_report(str(tmp_path))
