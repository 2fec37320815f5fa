"""The training loop: a prepared run (:mod:`attn_flax.training.setup`) -> jitted steps -> metrics and checkpoints.

:func:`train_and_evaluate` starts or resumes the run in ``workdir``. Each periodic action (log, eval, checkpoint,
the preemption check) is decided by :func:`attn_flax.training.durations.itstime` on the durations the config
gave in steps or epochs. Fault tolerance: the run resumes from its newest readable checkpoint, exactly (state,
RNG key and input position); SIGTERM saves a checkpoint at the current step and returns
(:mod:`~attn_flax.training.preemption`); a non-finite loss, parameter or BatchNorm statistic stops the run before
it is checkpointed (:mod:`~attn_flax.training.nan_guard`).
"""
import dataclasses
import math
import threading
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from attn_flax import data
from attn_flax.training import checkpoints, evaluation, nan_guard, preemption, setup, sharding, steps
from attn_flax.training.durations import itstime
from attn_flax.training.metrics import MetricsWriter, TrainMetrics, last_eval_metrics
from attn_flax.training.state import TrainState, abstract_state, init_train_state

PREEMPTION_CHECK_EVERY_STEPS = 1
"""A preemption notice is acted on at the next step: the grace period is short."""


@dataclasses.dataclass(frozen=True)
class Compiled:
    """The run's jitted functions, with the state replicated and batches split over the mesh."""

    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, steps.Batch], tuple[TrainState, steps.Metrics]]
    eval_step: evaluation.EvalStep
    all_finite: Callable[[TrainState], jax.Array]


def compile_steps(run: setup.Run) -> Compiled:
    """Jits initialisation, the train step (the state donated), the eval step and the finiteness check."""
    replicated, batch = sharding.replicated(run.mesh), sharding.batch_sharded(run.mesh)
    config = run.config
    train_step = steps.make_train_step(run.model, run.tx, run.schedule, label_smoothing=config.label_smoothing,
                                       grad_accum_steps=config.grad_accum_steps)
    return Compiled(
        init=jax.jit(lambda rng: init_train_state(run.model, run.tx, rng, run.image_shape), out_shardings=replicated),
        train_step=jax.jit(train_step, in_shardings=(replicated, batch), out_shardings=(replicated, replicated),
                           donate_argnums=0),
        eval_step=evaluation.compile_eval_step(run.model, run.mesh),
        all_finite=jax.jit(nan_guard.all_finite, in_shardings=(replicated,), out_shardings=replicated))


def initial_state(run: setup.Run, compiled: Compiled, manager: ocp.CheckpointManager, workdir: str
                  ) -> tuple[TrainState, int]:
    """The newest readable checkpoint's state and step, or a fresh state from the config's seed at step 0."""
    target = abstract_state(run.model, run.image_shape, sharding.replicated(run.mesh), run.tx)
    restored = checkpoints.restore_latest(manager, target)
    if restored is None:
        return compiled.init(jax.random.key(run.config.seed)), 0
    state, meta = restored
    if jax.process_index() == 0:
        print(f"resuming from the checkpoint at step {meta['step']} in {workdir}", flush=True)
    return state, int(meta["step"])


def train_batches(run: setup.Run, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of every global batch from ``start_step`` on (a pure function of seed and step)."""
    config = run.config
    return iter(data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=config.seed,
                                   start_step=start_step, process_index=jax.process_index(),
                                   process_count=jax.process_count(), data_dir=config.data_dir, cache=config.cache,
                                   image_size=run.info.image_size))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run: Optional[setup.Run] = None
                       ) -> dict[str, Any]:
    """Trains (resuming from ``workdir``'s newest checkpoint if any), evaluates, checkpoints; returns the last
    eval metrics. A run that is already finished changes nothing and returns its last eval metrics."""
    run = run or setup.prepare(config)
    previous = setup.check_workdir(config, workdir)
    if previous is not None and int(previous["step"]) >= run.steps.total:
        if jax.process_index() == 0:
            print(f"the run in {workdir} is finished: its checkpoint is at step {previous['step']} and the config "
                  f"plans {run.steps.total} steps; nothing to do (raise num_train_steps or num_epochs to train on)",
                  flush=True)
        return last_eval_metrics(workdir)
    setup.write_config(config, workdir)
    with preemption.sigterm_flag() as sigterm, checkpoints.save_errors_in_one_line():
        return _run(run, workdir, sigterm)


@dataclasses.dataclass
class _Outputs:
    """Where a run reports: its checkpoints, metric files, progress bar, and whether a save has failed."""

    manager: ocp.CheckpointManager
    writer: MetricsWriter
    progress: Optional[tqdm.tqdm] = None
    save_failed: bool = False

    def last_checkpoint(self) -> Optional[int]:
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()
        if not self.save_failed:  # after a failed save Orbax's manager can wait minutes for signals that never come
            checkpoints.finish(self.manager)


def _run(run: setup.Run, workdir: str, sigterm: threading.Event) -> dict[str, Any]:
    is_lead = jax.process_index() == 0
    manager = checkpoints.create_manager(workdir, keep=run.config.keep_checkpoints)
    out = _Outputs(manager, MetricsWriter(workdir, enabled=is_lead))
    try:
        compiled = compile_steps(run)
        state, start_step = initial_state(run, compiled, manager, workdir)
        if preemption.preempted(manager, start_step, sigterm):
            if is_lead:
                print(f"preempted before step {start_step + 1}: nothing new to save", flush=True)
            return {}
        out.progress = tqdm.tqdm(total=run.steps.total, initial=start_step, disable=not is_lead, desc="train",
                                 unit="step", dynamic_ncols=True)
        return _train(run, compiled, state, start_step, out, lambda step: preemption.preempted(manager, step, sigterm))
    finally:
        out.close()


def _train(run: setup.Run, compiled: Compiled, state: TrainState, start_step: int, out: _Outputs,
           preempted: Callable[[int], bool]) -> dict[str, Any]:
    """Steps ``start_step + 1 .. total``, with each periodic action when :func:`itstime`; returns the last eval
    metrics (none when preempted before the first evaluation)."""
    batches, batch_sharding = train_batches(run, start_step), sharding.batch_sharded(run.mesh)
    metrics, every, total = TrainMetrics(run.config.batch_size), run.steps, run.steps.total
    eval_metrics: dict[str, Any] = {}
    for step in range(start_step + 1, total + 1):
        state, step_metrics = compiled.train_step(state, sharding.global_batch(next(batches), batch_sharding))
        metrics.add(step, step_metrics)
        out.progress.update(1)
        stop = itstime(step, PREEMPTION_CHECK_EVERY_STEPS, total, last=False) and step < total and preempted(step)
        if itstime(step, every.log, total) or stop:
            _log(step, metrics, state, out)
        if itstime(step, every.checkpoint, total) or stop:
            _check_losses(metrics, state, out)
            _save(run, compiled, state, step, out)
        if stop:
            if jax.process_index() == 0:
                out.progress.write(f"preempted: saved a checkpoint at step {step} in {out.manager.directory}; "
                                   "run the same command to continue")
            break
        if itstime(step, every.eval, total):
            eval_metrics = _evaluate(run, compiled, state, step, out)
            metrics.restart_clock()
    return eval_metrics


def _check_losses(metrics: TrainMetrics, state: TrainState, out: _Outputs) -> None:
    """Fetches the pending steps' metrics; raises ``NonFiniteLossError`` at the first non-finite loss."""
    for step, row in metrics.fetch():
        if not math.isfinite(row["train_loss"]):
            raise nan_guard.non_finite_error(f"the training loss is {row['train_loss']}", step, state,
                                             row["learning_rate"], out.last_checkpoint())


def _log(step: int, metrics: TrainMetrics, state: TrainState, out: _Outputs) -> None:
    _check_losses(metrics, state, out)
    summary = metrics.summary()
    out.writer.write(step, summary)
    out.progress.set_postfix(loss=f"{summary['train_loss']:.3f}", acc=f"{summary['train_accuracy']:.3f}")


def _save(run: setup.Run, compiled: Compiled, state: TrainState, step: int, out: _Outputs) -> None:
    """Checks the whole state is finite, then starts saving it at ``step``."""
    if not bool(compiled.all_finite(state)):
        raise nan_guard.non_finite_error("parameters or BatchNorm statistics are not finite", step, state,
                                         float(run.schedule(step - 1)), out.last_checkpoint())
    try:
        checkpoints.save(out.manager, state, setup.run_meta(run.config, step))
    except checkpoints.CheckpointError:
        out.save_failed = True
        raise


def _evaluate(run: setup.Run, compiled: Compiled, state: TrainState, step: int, out: _Outputs) -> dict[str, Any]:
    """Scores the whole eval split with the run's compiled eval step, and reports it."""
    config = run.config
    result = evaluation.evaluate_split(compiled.eval_step, state, config.dataset, batch_size=config.eval_batch_size,
                                       data_dir=config.data_dir, mesh=run.mesh, num_classes=run.info.num_classes,
                                       image_size=run.info.image_size)
    out.writer.write(step, result)
    out.progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in result.items()))
    return result
