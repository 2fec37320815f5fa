"""Trains a ResNet with attention: ``python train.py --workdir=DIR [--config=configs/NAME.py] [--config.KEY=V]``.

Multi-host: pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every process, or
run under a cluster that JAX detects by itself (TPU pods, SLURM, Open MPI), where ``jax.distributed`` is
initialised without flags.

Exit codes: 0 when the run finished or was preempted (SIGTERM: a checkpoint is saved at the current step and the
same command continues the run); 2 for a config or command line the run cannot use (one line on stderr, before
anything compiles); 1 when training stopped on an error (a non-finite loss, no readable checkpoint), also in one
line. A run killed outright (``kill -9``, a lost machine) resumes from its latest checkpoint, exactly.
"""
import os
import sys
from typing import NoReturn, Optional

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from attn_flax import cli, ops
from attn_flax.cli import stderr_held

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.", required=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_integer("initialization_timeout", 300,
                     "Seconds a multi-process run waits at start-up for every process to connect.")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "Seconds without a heartbeat after which a process of a multi-process run counts as dead "
                     "and the others exit with an error.")
flags.DEFINE_integer("shutdown_timeout_seconds", 300,
                     "Seconds a finishing process waits at the shutdown barrier for the others.")

CLUSTER_ENV_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES")


def fail(message: str, code: int) -> NoReturn:
    """Prints ``train.py: error: MESSAGE`` as one line and exits with ``code``."""
    cli.fail("train.py", message, code)


def unknown_field(err: Exception, argv: list[str]) -> NoReturn:
    """Exits in one line for ml_collections' error on ``--config.KEY=V`` naming a field the config lacks."""
    fail(cli.unknown_field_message(err, argv), 2)


try:  # ml_collections applies --config.KEY=V overrides here, at definition
    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "configs", "default.py"),
                                    "Config file; override fields with --config.KEY=VALUE.", lock_config=True)
except (KeyError, AttributeError) as _err:
    unknown_field(_err, sys.argv)


def check_config_file(spec: Optional[str]) -> None:
    """Exits in one line when ``--config`` names no file (ml_collections would log a traceback and go on)."""
    problem = cli.config_file_problem(spec)
    if problem:
        fail(problem, 2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every command-line mistake reported in one line and exit code 2."""
    check_config_file(cli.config_spec(argv))
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # the config is loaded lazily: load it here so that its errors are reported as one line
        return rest
    except flags.Error as err:
        fail(f"{err}; see --helpfull", 2)
    except (KeyError, AttributeError) as err:
        unknown_field(err, argv)
    except Exception as err:  # noqa: BLE001 - anything the config file raises is the config file's error
        fail(cli.config_load_message(cli.config_spec(argv), err), 2)


def cluster_detected() -> bool:
    """True under a multi-process launcher JAX can configure itself from (more than one task or host)."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_NUM_SLICES" in os.environ


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from the flags or the cluster; nothing for a single process."""
    import jax

    timeouts = dict(initialization_timeout=FLAGS.initialization_timeout,
                    heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
                    shutdown_timeout_seconds=FLAGS.shutdown_timeout_seconds)
    if FLAGS.coordinator_address is not None:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, **timeouts)
    elif cluster_detected():
        jax.distributed.initialize(**timeouts)


def main(argv):
    del argv
    ops.retain_freed_memory()
    absl_logging.set_verbosity(absl_logging.WARNING)
    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if any(v is None for v in explicit) and any(v is not None for v in explicit):
        fail("give all of --coordinator_address, --num_processes and --process_id, or none", 2)
    config_error = None
    with stderr_held() as held:
        from attn_flax.training import checkpoints, config_checks, loop, nan_guard, setup

        initialize_distributed()
        try:
            config_checks.check_values(FLAGS.config)
            setup.check_workdir(FLAGS.config, FLAGS.workdir)
            run = setup.prepare(FLAGS.config)
        except config_checks.ConfigError as err:
            config_error, held.show = err, False
    if config_error is not None:
        fail(str(config_error), 2)
    try:
        loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, run)
    except config_checks.ConfigError as err:
        fail(str(err), 2)
    except (nan_guard.NonFiniteLossError, checkpoints.CheckpointError) as err:
        fail(str(err), 1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
