"""Trains a ResNet with attention: ``python train.py --workdir=DIR [--config=configs/NAME.py] [--config.KEY=V]``.

Multi-host: pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every process, or
run under a cluster that JAX detects by itself (TPU pods, SLURM, Open MPI), where ``jax.distributed`` is
initialised without flags. A config the run cannot use fails in one line with exit code 2.
"""
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.", required=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "configs", "default.py"),
                                "Config file; override fields with --config.KEY=VALUE.", lock_config=True)

CLUSTER_ENV_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES")


def cluster_detected() -> bool:
    """True under a multi-process launcher JAX can configure itself from (more than one task or host)."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_NUM_SLICES" in os.environ


def initialize_distributed() -> None:
    import jax

    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("give all of --coordinator_address, --num_processes and --process_id, or none")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif cluster_detected():
        jax.distributed.initialize()


def main(argv):
    del argv
    from attn_flax.training import loop

    absl_logging.set_verbosity(absl_logging.WARNING)
    initialize_distributed()
    try:
        run = loop.prepare(FLAGS.config)
    except loop.ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, run)


if __name__ == "__main__":
    app.run(main)
