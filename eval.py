"""Scores a checkpoint over the whole eval split: ``python eval.py --workdir=DIR`` or ``--checkpoint=DIR``.

``--workdir`` is a training run: its ``config.json`` gives the model, dataset and data_dir, and its newest readable
checkpoint is scored. ``--checkpoint`` is a converted official checkpoint (``python -m attn_flax.convert``); name
the dataset with ``--dataset`` (e.g. ``imagenet2012``, with ``--data_dir``) or a config file with ``--config``.

Prints one JSON line ``{"eval_loss", "eval_accuracy", "eval_top5_accuracy", "eval_examples", "step", ...}`` and
writes it to ``--output`` (default ``DIR/eval.json``). Every example is counted exactly once (the last batch is
padded with masked examples). Exit codes: 0 done, 2 a command line or directory that cannot be scored (one
line on stderr), 1 no checkpoint could be read.
"""
import json

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from attn_flax import cli, ops, paths

PROGRAM = "eval.py"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir: scores its newest checkpoint with its config.json.")
flags.DEFINE_string("checkpoint", None, "Converted official checkpoint directory (model.json + variables/).")
flags.DEFINE_string("dataset", None, "TFDS dataset to score on; required with --checkpoint unless --config names "
                    "one; with --workdir it replaces the run's dataset.")
flags.DEFINE_string("data_dir", None, "TFDS data directory; default: the run's (--workdir) or TFDS's default.")
flags.DEFINE_integer("batch_size", None, "Global eval batch size, a multiple of the device count; default: the "
                     "config's eval_batch_size.")
flags.DEFINE_string("output", None, "Where to write the JSON result; default DIR/eval.json.")
config_flags.DEFINE_config_file("config", None, "With --checkpoint: a config file whose dataset, data_dir and "
                                "eval_batch_size are used (e.g. configs/imagenet.py).", lock_config=False)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every command-line mistake reported in one line and exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        cli.fail(PROGRAM, f"{err}; see --helpfull")
    except (KeyError, AttributeError) as err:
        cli.fail(PROGRAM, f"bad --config override: {err}")


def check_flags(argv: list[str]) -> None:
    """Exits 2 for a command line that names no checkpoint, two of them, or a converted one without a dataset."""
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}; use --workdir=DIR or --checkpoint=DIR")
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        cli.fail(PROGRAM, "give exactly one of --workdir (a training run) or --checkpoint (a converted official "
                 "checkpoint)")
    if FLAGS.workdir is not None and FLAGS.config is not None:
        cli.fail(PROGRAM, "--config is for --checkpoint; a workdir is scored with its own config.json (use "
                 "--dataset/--data_dir to change where it reads the data)")
    if FLAGS.checkpoint is not None and FLAGS.dataset is None and FLAGS.config is None:
        cli.fail(PROGRAM, "--checkpoint needs --dataset (e.g. --dataset=imagenet2012 --data_dir=DIR) or --config")


def score() -> dict:
    """Loads the model named by the flags and evaluates it; returns the JSON result."""
    from attn_flax import trained
    from attn_flax.training import evaluation

    if FLAGS.workdir is not None:
        config = trained.read_config(FLAGS.workdir)
        if FLAGS.dataset is not None:
            config.dataset = FLAGS.dataset
        if FLAGS.data_dir is not None:
            config.data_dir = FLAGS.data_dir
        loaded = trained.from_workdir(FLAGS.workdir, config)
        dataset, data_dir = config.dataset, config.data_dir
        batch_size = FLAGS.batch_size or config.eval_batch_size
    else:
        config = FLAGS.config
        loaded = trained.from_converted(FLAGS.checkpoint)
        dataset = FLAGS.dataset or config.dataset
        data_dir = FLAGS.data_dir or (config.get("data_dir") if config is not None else None)
        batch_size = FLAGS.batch_size or (config.eval_batch_size if config is not None else 256)
    image_size = config.get("image_size") if config is not None else None
    metrics = evaluation.evaluate(loaded.model, loaded.variables, dataset, batch_size=batch_size,
                                  data_dir=data_dir, image_size=image_size)
    return {**metrics, "step": loaded.step, "dataset": dataset, "source": loaded.source}


def main(argv: list[str]) -> None:
    ops.retain_freed_memory()
    absl_logging.set_verbosity(absl_logging.ERROR)
    check_flags(argv)
    result = cli.run_or_fail(PROGRAM, score)
    output = paths.resolve(FLAGS.output or paths.resolve(FLAGS.workdir or FLAGS.checkpoint) / "eval.json")
    line = json.dumps(result, sort_keys=True)
    output.write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
