"""A study's runs: the cross product of swept config fields, times seeds, each an ordinary ``train.py`` run.

:func:`plan` turns a command line (a config file, ``--config.KEY=VALUE`` overrides shared by every run, the
``--sweep`` lists and the seeds) into :class:`PlannedRun` s, and checks every one of them with the trainer's own
parsing (:func:`attn_flax.cli.load_config`) and checks (``config_checks``, ``setup.prepare``,
``setup.check_workdir``) before anything runs, so a typo fails in one line (:class:`StudyError`). Each run's
workdir is ``STUDY/VARIANT/seed=S``, VARIANT naming the swept values (``attention=cbam,kernel_size=3``).
:func:`execute` runs the unfinished ones one after another in subprocesses; a finished run is skipped and an
interrupted one resumes from its checkpoint (the trainer's own resume), so the same command continues a sweep.
``STUDY/study.json`` records every planned run and its command, for the report and for runs started elsewhere.
"""
import dataclasses
import datetime
import fcntl
import itertools
import json
import os
import re
import signal
import subprocess
import time
from typing import Any, Callable, Optional, Sequence

import ml_collections

from attn_flax import cli
from attn_flax.training import checkpoints, config_checks, metrics, setup

PLAN_FILE = "study.json"
LOCK_FILE = PLAN_FILE + ".lock"
"""Held while an invocation adds its runs to the plan, so that invocations side by side keep each other's."""
LOG_FILE = "train.log"
ATTEMPTS_FILE = "study_attempts.jsonl"
"""Per run: what ``train.py`` printed, and one line per attempt (seconds, exit status, steps before and after)."""
IGNORED_FIELDS = ("data_dir", "cache")
"""Fields that may differ between a run's saved ``config.json`` and the sweep's config: where the data is read
from does not change the run."""
_BRACKETS = {"(": ")", "[": "]", "{": "}"}


class StudyError(ValueError):
    """A command line or study directory that cannot be run; the message is one line saying what to change."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One ``--sweep=KEY=V1,V2,...``: a config field and the values (as given on a command line) it takes."""

    key: str
    values: tuple[str, ...]


def split_values(text: str) -> list[str]:
    """``"a,(1,2),'x,y'"`` -> ``["a", "(1,2)", "'x,y'"]``: commas inside brackets or quotes do not split."""
    parts, current, closers, quote = [], [], [], None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _BRACKETS:
            closers.append(_BRACKETS[char])
        elif closers and char == closers[-1]:
            closers.pop()
        elif char == "," and not closers:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quote or closers:
        raise StudyError(f"unbalanced {'quote' if quote else 'brackets'} in {text!r}")
    parts.append("".join(current).strip())
    return parts


def parse_sweep(text: str) -> Sweep:
    """``'attention_options.order=channel_first,parallel'`` -> a :class:`Sweep`; raises :class:`StudyError`."""
    key, eq, values_text = text.partition("=")
    key = key.strip().removeprefix("config.")
    syntax = "give --sweep=KEY=V1,V2,... (e.g. --sweep=attention=none,cbam)"
    if not eq or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise StudyError(f"--sweep={text}: {syntax}")
    try:
        values = split_values(values_text)
    except StudyError as err:
        raise StudyError(f"--sweep={text}: {err}; {syntax}") from None
    if any(not v for v in values):
        raise StudyError(f"--sweep={text}: an empty value; {syntax}")
    if len(set(values)) != len(values):
        raise StudyError(f"--sweep={text}: a value is given twice")
    if key == "seed":
        raise StudyError(f"--sweep={text}: give the seeds with --seeds=0,1,2")
    return Sweep(key, tuple(values))


def parse_seeds(texts: Sequence[str]) -> tuple[int, ...]:
    """``['0', '1', '2']`` -> (0, 1, 2): distinct whole numbers >= 0; raises :class:`StudyError`."""
    try:
        seeds = tuple(int(s) for s in texts)
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise StudyError(f"--seeds={','.join(texts)}: give distinct whole numbers >= 0, e.g. --seeds=0,1,2")
    return seeds


def parse_overrides(args: Sequence[str]) -> tuple[str, ...]:
    """Checks the shared ``--config.KEY=VALUE`` arguments; raises :class:`StudyError`."""
    for arg in args:
        if not re.fullmatch(r"--config\.[A-Za-z_][\w.]*=.*", arg, re.S):
            raise StudyError(f"{arg}: give --config.KEY=VALUE (with '=')")
        if arg.startswith("--config.seed="):
            raise StudyError(f"{arg}: give the seeds with --seeds=0,1,2")
    return tuple(args)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its variant (the swept values), seed, workdir and ``train.py`` arguments."""

    variant: str
    seed: int
    workdir: str
    args: tuple[str, ...]
    config: ml_collections.ConfigDict
    total_steps: int
    done_steps: int

    @property
    def name(self) -> str:
        return f"{self.variant}/seed={self.seed}"

    @property
    def finished(self) -> bool:
        return self.done_steps >= self.total_steps


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _value_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "+".join(_value_text(v) for v in value) or "none"
    return re.sub(r"[^\w.+-]", "_", str(value))


def variant_name(sweeps: Sequence[Sweep], config: ml_collections.ConfigDict) -> str:
    """The directory name of a combination: ``key=value`` of each swept field as the config reads it, the key's
    last part (``attention_options.order`` -> ``order``) unless two swept keys share it; ``base`` when nothing is
    swept."""
    last = [s.key.rsplit(".", 1)[-1] for s in sweeps]
    short = [k if last.count(k) == 1 else s.key for k, s in zip(last, sweeps)]
    return ",".join(f"{k}={_value_text(_get(config, s.key))}" for k, s in zip(short, sweeps)) or "base"


def _saved_config_conflict(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
    """The first field whose value differs between ``config`` and the run's saved ``config.json``, if any."""
    path = os.path.join(workdir, setup.CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    planned = json.loads(config.to_json_best_effort())
    for key in sorted(set(saved) | set(planned)):
        if key not in IGNORED_FIELDS and saved.get(key) != planned.get(key):
            return f"{key}={saved.get(key)!r}, this sweep says {planned.get(key)!r}"
    return None


def plan(study_dir: str, config_spec: str, overrides: Sequence[str], sweeps: Sequence[Sweep],
         seeds: Sequence[int]) -> list[PlannedRun]:
    """Every run of the study, each checked as ``train.py`` would check it; raises :class:`StudyError` (one line)
    for the first that cannot run, before anything is written."""
    keys = [s.key for s in sweeps]
    given = {a.split("=", 1)[0].removeprefix("--config.") for a in overrides}
    for key in keys:
        if keys.count(key) > 1 or key in given:
            raise StudyError(f"--sweep={key}=...: {key} is {'swept twice' if keys.count(key) > 1 else 'also set by --config.' + key}"
                             "; give each field once")
    runs, names = [], {}
    for values in itertools.product(*(s.values for s in sweeps)):
        swept = tuple(f"--config.{s.key}={v}" for s, v in zip(sweeps, values))
        label = " ".join(swept) or config_spec
        prepared = None
        for seed in seeds:
            args = (f"--config={config_spec}", *overrides, *swept, f"--config.seed={seed}")
            try:
                config = cli.load_config(config_spec, args[1:])
                if prepared is None:
                    config_checks.check_values(config)
                    prepared = setup.prepare(config)
                    variant = variant_name(sweeps, config)
                    if names.setdefault(variant, values) != values:
                        raise StudyError(f"{variant} names two combinations of the sweep; give each value once")
            except (ValueError, config_checks.ConfigError) as err:
                raise StudyError(f"{label}: {str(err).splitlines()[0]}") from None
            workdir = os.path.join(study_dir, variant, f"seed={seed}")
            try:
                meta = setup.check_workdir(config, workdir)
            except config_checks.ConfigError as err:
                raise StudyError(f"{label}: {err}") from None
            conflict = _saved_config_conflict(config, workdir)
            if conflict:
                raise StudyError(f"{workdir} was run with {conflict}; a study's runs keep their config: give the "
                                 "original value or another --workdir")
            runs.append(PlannedRun(variant, seed, workdir, (*args, f"--workdir={workdir}"), config,
                                   prepared.steps.total, int(meta["step"]) if meta else 0))
    return runs


def command(run: PlannedRun, python: str, train_script: str) -> list[str]:
    """The ``train.py`` command line of ``run``."""
    return [python, train_script, *run.args]


def _add_to_plan(study: dict[str, Any], study_dir: str, runs: Sequence[PlannedRun], invocation: Sequence[str],
                 python: str, train_script: str) -> dict[str, Any]:
    """``study`` (study.json's content) with ``invocation`` recorded once, newest last, and ``runs`` added."""
    invocation = list(invocation)
    invocations = [i for i in study["invocations"] if i["argv"] != invocation]
    invocations.append({"argv": invocation,
                        "planned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    planned = dict(study["runs"])
    for run in runs:
        planned[os.path.relpath(run.workdir, study_dir)] = {
            "variant": run.variant, "seed": run.seed, "total_steps": run.total_steps,
            "attention": run.config.attention, "command": command(run, python, train_script)}
    return {**study, "invocations": invocations, "runs": planned}


def write_plan(study_dir: str, runs: Sequence[PlannedRun], invocation: Sequence[str], python: str,
               train_script: str) -> str:
    """Adds ``runs`` and the command that planned them to ``STUDY/study.json`` (kept across invocations, so that
    several sweeps into one directory make one study); returns its path. Invocations started side by side (one
    per variant on a shared machine, or a scheduler's array job) each add theirs: the read-modify-write holds an
    exclusive lock on :data:`LOCK_FILE` and writes through a temporary file of its own."""
    path = os.path.join(study_dir, PLAN_FILE)
    os.makedirs(study_dir, exist_ok=True)
    with open(os.path.join(study_dir, LOCK_FILE), "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        study = {"invocations": [], "runs": {}}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                study = json.load(f)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(_add_to_plan(study, study_dir, runs, invocation, python, train_script), f, indent=1)
        os.replace(temporary, path)
    return path


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f.read()[-20_000:].replace("\r", "\n").splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def _attempt(run: PlannedRun, cmd: list[str], env: Optional[dict[str, str]]) -> tuple[int, float, bool]:
    """Runs ``cmd`` with its output appended to the run's log; SIGTERM to this process is passed on (the trainer
    saves a checkpoint and exits 0). Returns the exit status, the seconds it took, and whether SIGTERM came."""
    os.makedirs(run.workdir, exist_ok=True)
    stopped = []
    with open(os.path.join(run.workdir, LOG_FILE), "a", encoding="utf-8") as log:
        log.write(f"$ {subprocess.list2cmdline(cmd)}\n")
        log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

        def forward(signum, frame):
            stopped.append(signum)
            proc.send_signal(signal.SIGTERM)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C: the run saves its checkpoint before the sweep stops
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    return code, time.monotonic() - start, bool(stopped)


def execute(runs: Sequence[PlannedRun], python: str, train_script: str, *, env: Optional[dict[str, str]] = None,
            say: Callable[[str], None] = print) -> int:
    """Runs every unfinished run, one after another; returns the exit status for the study command: 0 when all
    are finished (or SIGTERM stopped the sweep: the same command continues it), 2 at the first run that
    ``train.py`` refuses (a command-line problem would repeat), 1 when a run failed (the others still run)."""
    failed = []
    for i, run in enumerate(runs, start=1):
        head = f"[{i}/{len(runs)}] {run.name}"
        if run.finished:
            say(f"{head}: finished ({run.done_steps} steps), skipped")
            continue
        say(f"{head}: " + (f"resuming at step {run.done_steps} of {run.total_steps}" if run.done_steps
                           else f"starting, {run.total_steps} steps"))
        code, seconds, stopped = _attempt(run, command(run, python, train_script), env)
        meta = checkpoints.latest_meta(run.workdir)
        step = int(meta["step"]) if meta else 0
        with open(os.path.join(run.workdir, ATTEMPTS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps({"seconds": round(seconds, 3), "returncode": code, "from_step": run.done_steps,
                                "to_step": step}) + "\n")
        log = os.path.join(run.workdir, LOG_FILE)
        if code == 0 and step >= run.total_steps:
            result = metrics.last_eval_metrics(run.workdir)
            accuracy = f", eval_accuracy {result['eval_accuracy']:.4f}" if "eval_accuracy" in result else ""
            say(f"{head}: done in {seconds:.0f} s{accuracy}")
        elif code == 0 or stopped:
            say(f"{head}: stopped at step {step} of {run.total_steps}; run the same command to continue")
            return 0
        elif code == 2:
            say(f"{head}: train.py refused the run (exit 2): {_last_line(log)}")
            return 2
        else:
            failed.append(run.name)
            say(f"{head}: failed (exit {code}) at step {step}: {_last_line(log)} (see {log})")
    if failed:
        say(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}; the same command retries them")
        return 1
    return 0
