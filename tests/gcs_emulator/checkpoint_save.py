"""Times checkpoint saves of the default config's train state, as train.py makes them, into each DIR given.

    python tests/gcs_emulator/checkpoint_save.py DIR [DIR...] [--saves=N]

A DIR may be local or gs:// (run gs:// through ``tests/gcs_emulator/run.sh STATE``). For each DIR: N saves of the
same state at steps 1..N through :mod:`attn_flax.training.checkpoints` (asynchronous, keep 2, as in training);
prints the median time the training loop is blocked by ``save`` and the median time until the save is
committed (``wait_until_finished``), in seconds, and the state's size. Run from the repository root.
"""
import argparse
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, ".")
from attn_flax.training import checkpoints, optim, setup, sharding  # noqa: E402
from attn_flax.training.state import init_train_state  # noqa: E402
from configs import default  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    config = default.get_config()
    model = setup.build_model(config, num_classes=10)
    tx = optim.create_optimizer(config, lambda step: config.base_learning_rate)
    mesh = sharding.data_mesh()
    state = jax.jit(lambda rng: init_train_state(model, tx, rng, (32, 32, 3)),
                    out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(jax.device_get(state))
               if not jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key))
    print(f"{config.model} attention={config.attention} widths={tuple(config.widths)}: state {size / 2**20:.2f} MiB "
          f"({jax.device_count()} devices, jax {jax.__version__})", flush=True)
    for directory in args.dirs:
        manager = checkpoints.create_manager(directory, keep=2)
        blocked, committed = [], []
        for step in range(1, args.saves + 1):
            start = time.perf_counter()
            checkpoints.save(manager, state, setup.run_meta(config, step))
            blocked.append(time.perf_counter() - start)
            manager.wait_until_finished()
            committed.append(time.perf_counter() - start)
        checkpoints.finish(manager)
        print(f"{directory}: blocked {statistics.median(blocked):.3f} s, committed after "
              f"{statistics.median(committed):.3f} s (median of {args.saves}; first save "
              f"{committed[0]:.3f} s)", flush=True)


if __name__ == "__main__":
    main()
