"""A study's report: ``STUDY/results.md`` (one row per variant, mean ± standard deviation over seeds, the
difference to the baseline with Welch's 95% interval) and ``STUDY/results.png`` (accuracy per variant with error
bars, and the eval curves), from ``STUDY/study.json`` and each run's ``metrics.jsonl``.

A run counts once it is finished: its last evaluation is at the step the plan gives it. Unfinished runs are
listed under the table and left out of it.
"""
import dataclasses
import json
import math
import os
import shlex
from typing import Any, Optional, Sequence

import numpy as np

from attn_flax.study import stats
from attn_flax.study.sweep import ATTEMPTS_FILE, PLAN_FILE, StudyError
from attn_flax.training import metrics

RESULTS_MD, RESULTS_PNG = "results.md", "results.png"


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run as its files tell it."""

    path: str
    variant: str
    seed: int
    attention: str
    total_steps: int
    final: dict[str, Any]              # the last eval event (step included); {} when there is none
    curve: list[tuple[int, float]]     # (step, eval_accuracy) of every evaluation
    wall_seconds: Optional[float]      # the study tool's attempts; None when the run was started elsewhere
    train_seconds: float               # from the logged throughput: training steps only

    @property
    def finished(self) -> bool:
        return self.final.get("step") == self.total_steps


@dataclasses.dataclass(frozen=True)
class VariantRow:
    """One row of the table: the finished runs of a variant."""

    variant: str
    attention: str
    runs: list[RunResult]

    def values(self, key: str) -> list[float]:
        return [r.final[key] for r in self.runs]

    @property
    def steps(self) -> str:
        steps = sorted({r.total_steps for r in self.runs})
        return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"

    @property
    def seconds(self) -> tuple[float, bool]:
        """Mean seconds per run, and whether they are estimates (training time from the logged throughput)."""
        measured = all(r.wall_seconds is not None for r in self.runs)
        return (float(np.mean([r.wall_seconds if measured else r.train_seconds for r in self.runs])) if self.runs
                else math.nan, not measured)


def _train_seconds(events: Sequence[dict[str, Any]]) -> float:
    """Seconds of training that the train events account for: steps since the previous event over the logged
    steps per second, plus the first step (compilation) of each attempt."""
    total, previous = 0.0, 0
    for event in events:
        if "steps_per_second" in event and event["steps_per_second"] > 0:
            total += (event["step"] - previous) / event["steps_per_second"]
        total += event.get("first_step_seconds", 0.0)
        if "train_loss" in event:
            previous = event["step"]
    return total


def read_run(study_dir: str, path: str, planned: dict[str, Any]) -> RunResult:
    """What ``STUDY/path`` holds: its evaluations and time (empty when it has not started)."""
    workdir = os.path.join(study_dir, path)
    try:
        events = metrics.read_metrics(workdir)
    except FileNotFoundError:
        events = []
    evals = [e for e in events if "eval_accuracy" in e]
    wall = None
    attempts = os.path.join(workdir, ATTEMPTS_FILE)
    if os.path.isfile(attempts):
        with open(attempts, encoding="utf-8") as f:
            wall = sum(json.loads(line)["seconds"] for line in f if line.strip())
    return RunResult(path, planned["variant"], planned["seed"], planned.get("attention", ""),
                     planned["total_steps"], evals[-1] if evals else {},
                     [(e["step"], e["eval_accuracy"]) for e in evals], wall,
                     _train_seconds([e for e in events if "train_loss" in e]))


def read_study(study_dir: str) -> tuple[dict[str, Any], list[RunResult]]:
    """``study.json`` and every planned run; raises :class:`StudyError` when there is no study in ``study_dir``."""
    path = os.path.join(study_dir, PLAN_FILE)
    if not os.path.isfile(path):
        raise StudyError(f"{study_dir} has no {PLAN_FILE}: it is written by `study.py run` (or its --dry_run) "
                         "into the --workdir it is given")
    with open(path, encoding="utf-8") as f:
        study = json.load(f)
    return study, [read_run(study_dir, p, planned) for p, planned in study["runs"].items()]


def variant_rows(runs: Sequence[RunResult]) -> list[VariantRow]:
    """The finished runs grouped by variant, in the order the study planned them."""
    rows: dict[str, VariantRow] = {}
    for run in runs:
        row = rows.setdefault(run.variant, VariantRow(run.variant, run.attention, []))
        if run.finished:
            row.runs.append(run)
    return [row for row in rows.values() if row.runs]


def choose_baseline(rows: Sequence[VariantRow], baseline: Optional[str]) -> Optional[VariantRow]:
    """The row named ``baseline``, or else the one variant without attention (None when there is not one)."""
    if baseline is not None:
        for row in rows:
            if row.variant == baseline:
                return row
        raise StudyError(f"--baseline={baseline}: no finished variant has that name; the variants are "
                         + ", ".join(r.variant for r in rows))
    plain = [r for r in rows if r.attention == "none"]
    return plain[0] if len(plain) == 1 else None


def _pm(values: Sequence[float], scale: float, digits: int) -> str:
    mean, std = stats.mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _difference(row: VariantRow, baseline: Optional[VariantRow]) -> str:
    if baseline is None:
        return "n/a"
    if row is baseline:
        return "(baseline)"
    d = stats.welch_interval([100 * v for v in row.values("eval_accuracy")],
                             [100 * v for v in baseline.values("eval_accuracy")])
    if d is None:
        return "n/a (n < 2)"
    return f"{d.diff:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"


def _duration(seconds: float, estimated: bool) -> str:
    if math.isnan(seconds):
        return ""
    text = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return ("~" if estimated else "") + text


def markdown(study_dir: str, study: dict[str, Any], runs: Sequence[RunResult], rows: Sequence[VariantRow],
             baseline: Optional[VariantRow]) -> str:
    """The text of ``results.md``."""
    base = baseline.variant if baseline else None
    lines = [f"# Study results: {os.path.basename(os.path.abspath(study_dir))}", "",
             f"| variant | n | top-1 % (mean ± std) | Δ top-1 vs {base or 'baseline'}, points [95% interval] "
             "| eval loss (mean ± std) | steps | time per run |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.variant} | {len(row.runs)} | {_pm(row.values('eval_accuracy'), 100, 2)} | "
                     f"{_difference(row, baseline)} | {_pm(row.values('eval_loss'), 1, 4)} | {row.steps} | "
                     f"{_duration(*row.seconds)} |")
    total = sum(r.wall_seconds if r.wall_seconds is not None else r.train_seconds for r in runs)
    lines += ["", "How to read it: top-1 and loss are each run's final evaluation on the whole eval split, as mean "
              "± sample standard deviation (n - 1) over the seeds; n counts the finished runs. The interval is "
              "Welch's two-sided 95% t interval for the difference of mean top-1 (variant minus "
              f"{base or 'the baseline'}; unequal variances, Welch-Satterthwaite degrees of freedom), computed "
              "for each row on its own, with no correction for the number of rows compared: an interval that "
              "contains 0 cannot tell the two apart at these seeds. Time per run is the wall time of the "
              "study tool's attempts (start-up, compilation and evaluation included); ~ marks an estimate from "
              "the logged training throughput, for runs started elsewhere.",
              "", f"Compute: {len(runs)} runs planned, {sum(r.finished for r in runs)} finished, "
              f"{_duration(total, any(r.wall_seconds is None for r in runs))} in all.", ""]
    if baseline is None:
        lines += ["No baseline: give `--baseline=VARIANT`, or sweep `attention=none` (exactly one variant without "
                  "attention is taken as the baseline).", ""]
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        lines += [f"Not in the table ({len(unfinished)} unfinished, the same `study.py run` command continues "
                  "them): " + ", ".join(f"{r.path} (last eval at step {r.final.get('step', '-')} of "
                                        f"{r.total_steps})" for r in unfinished), ""]
    lines += ["Commands:", "", "```", *(shlex.join(i["argv"]) for i in study["invocations"]), "```", "",
              f"![results]({RESULTS_PNG})", ""]
    return "\n".join(lines)


def figure(rows: Sequence[VariantRow]):
    """A matplotlib Figure: final top-1 per variant (mean ± std, each seed a dot) and the mean eval curves."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 1.2 + 0.4 * max(len(rows), 6)), layout="constrained")
    bars, curves = fig.subplots(1, 2, width_ratios=(1, 1.2))
    y = np.arange(len(rows))[::-1]
    for i, (row, pos) in enumerate(zip(rows, y)):
        accuracy = 100 * np.asarray(row.values("eval_accuracy"))
        mean, std = stats.mean_std(accuracy)
        bars.errorbar(mean, pos, xerr=0 if math.isnan(std) else std, fmt="o", color="C0", capsize=4)
        bars.plot(accuracy, np.full(len(accuracy), pos) + 0.15, ".", color="0.5")
        steps = sorted(set.intersection(*(set(s for s, _ in r.curve) for r in row.runs)))
        if steps:
            mean_curve = [np.mean([dict(r.curve)[s] for r in row.runs]) * 100 for s in steps]
            style = ("o" if len(steps) < 12 else "") + ("-", "--", ":")[i // 10 % 3]  # 10 colours, then dashes
            curves.plot(steps, mean_curve, style, color=f"C{i % 10}", label=row.variant, markersize=3)
    bars.set_yticks(y, [f"{r.variant} (n={len(r.runs)})" for r in rows])
    bars.set_ylim(-0.6, len(rows) - 0.4)
    bars.set_xlabel("final top-1 % (mean ± std over seeds; grey: each seed)")
    bars.grid(axis="x", alpha=0.3)
    curves.set_xlabel("step")
    curves.set_ylabel("eval top-1 % (mean over seeds)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: curves cross
    return fig


def write_report(study_dir: str, baseline: Optional[str] = None) -> tuple[str, str]:
    """Writes ``results.md`` and ``results.png`` into ``study_dir``; returns their paths. Raises
    :class:`StudyError` when there is no study or no finished run."""
    study, runs = read_study(study_dir)
    rows = variant_rows(runs)
    if not rows:
        raise StudyError(f"no run in {study_dir} has finished yet ({len(runs)} planned); `study.py run` with the "
                         "same arguments runs them")
    chosen = choose_baseline(rows, baseline)
    md, png = os.path.join(study_dir, RESULTS_MD), os.path.join(study_dir, RESULTS_PNG)
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(study_dir, study, runs, rows, chosen))
    figure(rows).savefig(png, dpi=110)
    return md, png
