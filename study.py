"""Runs a grid of train.py runs over seeds and reports mean ± std per variant (see docs/study.md).

    python study.py run --workdir=DIR [--config=configs/NAME.py[:ARG]] --sweep='attention=none,se,cbam'
        [--sweep='attention_options.order=channel_first,parallel' ...] --seeds=0,1,2 [--config.KEY=VALUE ...]
        [--dry_run]
    python study.py report --workdir=DIR [--baseline=VARIANT]

``run`` runs every combination (the cross product of the --sweep lists, times the seeds) as an ordinary train.py
run in DIR/VARIANT/seed=S, one after another; finished runs are skipped and interrupted ones resume, so the same
command continues a sweep. Every combination is checked with train.py's own checks first: an unknown field, a
value the config or a module rejects, or a bad --sweep fails in one line before any run starts. --dry_run prints
the train.py commands, one per line (for a cluster scheduler), and only records the plan in DIR/study.json.
``report`` writes DIR/results.md and DIR/results.png from every finished run's metrics.jsonl.

Exit codes: 0 done (or stopped by SIGTERM: the running run saves a checkpoint; the same command continues);
2 a command line the study cannot use (one line on stderr); 1 a run failed (the others still ran).
"""
import os
import shlex
import sys

from absl import app, flags
from absl import logging as absl_logging

from attn_flax import cli

PROGRAM = "study.py"
HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = ("run", "report")
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The study's directory: one workdir per run under it, study.json, results.",
                    required=True)
flags.DEFINE_string("config", None, "run: the config file (FILE[:ARG]) of every run; default configs/default.py.")
flags.DEFINE_multi_string("sweep", [], "run: KEY=V1,V2,... a config field and its values (repeat for a cross "
                          "product); commas inside brackets or quotes do not split: pool_types=('avg',),('max',)")
flags.DEFINE_list("seeds", ["0"], "run: the seeds of every combination, e.g. 0,1,2.")
flags.DEFINE_bool("dry_run", False, "run: print the train.py commands instead of running them.")
flags.DEFINE_string("baseline", None, "report: the variant the others are compared with; default: the one "
                    "variant with attention=none.")


def relative(path: str) -> str:
    """``path`` relative to the current directory when it lies under it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags; ``--config.KEY=VALUE`` are kept aside for train.py. Mistakes exit 2 in one line."""
    global OVERRIDES
    OVERRIDES = [a for a in argv[1:] if a.startswith("--config.")]
    try:
        rest = FLAGS([a for a in argv if not a.startswith("--config.")])
    except flags.Error as err:
        cli.fail(PROGRAM, f"{err}; see --helpfull")
    if len(rest) != 2 or rest[1] not in COMMANDS:
        cli.fail(PROGRAM, f"give one command, {' or '.join(COMMANDS)}: python study.py run --workdir=DIR "
                 "--sweep=attention=none,cbam --seeds=0,1,2 (got " + (" ".join(rest[1:]) or "none") + ")")
    return rest


OVERRIDES: list[str] = []


def run() -> int:
    from attn_flax.study import sweep

    try:
        overrides = sweep.parse_overrides(OVERRIDES)
        sweeps = [sweep.parse_sweep(s) for s in FLAGS.sweep]
        seeds = sweep.parse_seeds(FLAGS.seeds)
    except sweep.StudyError as err:
        cli.fail(PROGRAM, str(err))
    spec = FLAGS.config or relative(os.path.join(HERE, "configs", "default.py"))
    error = None
    with cli.stderr_held() as held:  # TensorFlow's, TFDS's and XLA's start-up chatter: dropped
        held.show = False
        import jax

        jax.config.update("jax_platforms", "cpu")  # checking needs no accelerator: leave it to the runs
        try:
            runs = sweep.plan(FLAGS.workdir, spec, overrides, sweeps, seeds)
        except sweep.StudyError as err:
            error = err
    if error is not None:
        cli.fail(PROGRAM, str(error))
    python, train_script = sys.executable, relative(os.path.join(HERE, "train.py"))
    sweep.write_plan(FLAGS.workdir, runs, [PROGRAM, *sys.argv[1:]], python, train_script)
    if FLAGS.dry_run:
        for r in runs:
            print(shlex.join(sweep.command(r, python, train_script)), flush=True)
        return 0
    return sweep.execute(runs, python, train_script, say=lambda line: print(line, flush=True))


def report() -> int:
    from attn_flax.study import report as study_report
    from attn_flax.study.sweep import StudyError

    try:
        md, png = study_report.write_report(FLAGS.workdir, FLAGS.baseline)
    except StudyError as err:
        cli.fail(PROGRAM, str(err))
    with open(md, encoding="utf-8") as f:
        print(f.read().split("\n\n")[1], flush=True)  # the table
    print(f"wrote {md} and {png}", flush=True)
    return 0


def main(argv: list[str]) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    given = [name for name in ("sweep", "seeds", "dry_run", "config") if FLAGS[name].present]
    if argv[1] == "report" and (given or OVERRIDES):
        cli.fail(PROGRAM, f"--{(given or ['config.KEY'])[0]} is for `run`; `report` reads the runs' own files")
    if argv[1] == "run" and FLAGS.baseline is not None:
        cli.fail(PROGRAM, "--baseline is for `report`")
    sys.exit(run() if argv[1] == "run" else report())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
