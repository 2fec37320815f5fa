"""The training loop: config -> dataset -> model -> jitted steps -> metrics and checkpoints.

:func:`prepare` checks the config and builds everything that needs no compilation, so a user's typo fails in
seconds; :func:`train_and_evaluate` then runs (or resumes) the run in ``workdir``.

Fault tolerance: the run resumes from its newest readable checkpoint, exactly (state, RNG key and input position);
SIGTERM (a preemption notice) saves a checkpoint at the current step and returns; a non-finite loss, parameter or
BatchNorm statistic stops the run before it is checkpointed (:class:`NonFiniteLossError`).
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import linen as nn

from attn_flax import data, evaluation, models
from attn_flax.training import checkpoints, config_checks, optim, sharding, steps
from attn_flax.training.config_checks import ConfigError
from attn_flax.training.metrics import MetricsWriter, read_metrics
from attn_flax.training.state import TrainState, init_train_state


def attention_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The attention options the config sets (unset placeholders are left to the module's defaults)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.attention_options.items()
            if v is not None}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The config's ResNet with its attention; ``widths``/``stage_sizes`` override the depth's defaults."""
    model = models.create_model(config.model, num_classes=num_classes, attention=config.attention,
                                stem=config.stem, dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
                                zero_init_last_bn=config.zero_init_last_bn,
                                bn_group_size=config.get("bn_group_size"), **attention_options(config))
    overrides = {k: tuple(config[k]) for k in ("widths", "stage_sizes") if config.get(k) is not None}
    return model.clone(**overrides) if overrides else model


def _check_bn_group_size(config: ml_collections.ConfigDict) -> None:
    group, micro_batch = config.get("bn_group_size"), config.batch_size // config.grad_accum_steps
    if group is not None and (group < 2 or micro_batch % group):
        raise ValueError(f"bn_group_size {group} must be at least 2 and divide the {micro_batch} examples of each "
                         "(micro-)batch (batch_size / grad_accum_steps); choose a divisor or leave it unset")


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """``num_train_steps`` when positive, else (-1) ``num_epochs`` worth of global batches (rounded up); the
    values are checked by :func:`attn_flax.training.config_checks.check_values`."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return math.ceil(config.num_epochs * num_train_examples / config.batch_size)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything :func:`train_and_evaluate` needs, built and checked before any compilation."""

    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    num_steps: int
    steps_per_epoch: int


def prepare(config: ml_collections.ConfigDict) -> Run:
    """Validates the config against the registries, the dataset and the devices; raises ConfigError."""
    config_checks.check_values(config)
    try:
        build_model(config, num_classes=2)  # a bad model or attention is reported before the dataset is touched
        info = data.dataset_info(config.dataset, data_dir=config.data_dir)
        model = build_model(config, info.num_classes)
        mesh = sharding.data_mesh()
        sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
        _check_bn_group_size(config)
        if config.batch_size % jax.process_count():
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes "
                             f"({jax.process_count()})")
        steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
        total = num_train_steps(config, info.num_train_examples)
        schedule = optim.learning_rate_schedule(config, total, steps_per_epoch)
        tx = optim.create_optimizer(config, schedule)
    except (ValueError, TypeError, data.DatasetNotPreparedError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    return Run(config, info, model, tx, schedule, mesh, total, steps_per_epoch)


def _init_state(run: Run) -> tuple[TrainState, Any]:
    """Initialises the state replicated on the mesh; returns it and its abstract (sharded) shape."""
    replicated = sharding.replicated(run.mesh)
    image_shape = (run.info.image_size, run.info.image_size, 3)
    init = jax.jit(lambda rng: init_train_state(run.model, run.tx, rng, image_shape), out_shardings=replicated)
    rng = jax.random.key(run.config.seed)
    return init, checkpoints.abstract(jax.eval_shape(init, rng), replicated)


def _run_meta(run: Run, step: int) -> dict[str, Any]:
    return {"step": step, "seed": run.config.seed, "dataset": run.config.dataset,
            "batch_size": run.config.batch_size}


RESUME_FIELDS = ("seed", "dataset", "batch_size")
"""Fields a checkpoint's meta records: they fix the input stream, so a run resumes only with the same values."""
ARCHITECTURE_FIELDS = ("model", "attention", "attention_options", "stem", "widths", "stage_sizes")
"""Fields of ``config.json`` that fix the parameters' shapes: a checkpoint restores only into the same ones."""


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value,
                                 default=list))


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict[str, Any]]:
    """Whether ``config`` may run in ``workdir``, checked without writing, preparing or compiling anything.

    Returns the meta of the newest checkpoint there (None for a new run). Raises :class:`ConfigError` when the
    workdir is a file, or when its checkpoint was made with other :data:`RESUME_FIELDS` or, per its
    ``config.json``, another architecture (:data:`ARCHITECTURE_FIELDS`): such a run cannot continue that one.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; give a directory path (it is created "
                          "if missing)")
    meta = checkpoints.latest_meta(workdir)
    if meta is None:
        return None
    changed = [(k, meta.get(k), config[k]) for k in RESUME_FIELDS if meta.get(k) != config[k]]
    saved_config = os.path.join(workdir, "config.json")
    if os.path.isfile(saved_config):
        with open(saved_config, encoding="utf-8") as f:
            saved = json.load(f)
        changed += [(k, saved.get(k), config.get(k)) for k in ARCHITECTURE_FIELDS
                    if k in saved and _as_json(saved[k]) != _as_json(config.get(k))]
    if changed:
        key, before, now = changed[0]
        raise ConfigError(f"the checkpoint at step {meta['step']} in {workdir} was made with {key}={before!r}, the "
                          f"config says {_as_json(now)!r}; use a new --workdir or the original value")
    return meta


def last_eval_metrics(workdir: str) -> dict[str, float]:
    """The newest eval row of ``WORKDIR/metrics.jsonl`` without its step ({} when there is none)."""
    try:
        rows = [r for r in read_metrics(workdir) if "eval_accuracy" in r]
    except FileNotFoundError:
        return {}
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def evaluate(run: Run, eval_step, state: TrainState) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole eval split, each example counted exactly once."""
    return evaluation.evaluate_split(eval_step, state, run.config.dataset, batch_size=run.config.eval_batch_size,
                                     data_dir=run.config.data_dir, mesh=run.mesh,
                                     num_classes=run.info.num_classes)


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite."""


def _all_finite(state: TrainState) -> jax.Array:
    """True when every parameter and BatchNorm statistic is finite."""
    leaves = jax.tree.leaves((state.params, state.batch_stats))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


SMALL_LEARNING_RATE = 1e-4  # below this a divergence is not the learning rate's doing


def first_non_finite_leaf(state: TrainState) -> Optional[str]:
    """The path of the first parameter or BatchNorm statistic with a NaN or infinity, e.g.
    ``params/stage1_block0/attention/ChannelGate/fc1/kernel``; None when all are finite."""
    for path, leaf in jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats}):
        if not np.all(np.isfinite(np.asarray(jax.device_get(leaf), np.float32))):
            return "/".join(str(getattr(key, "key", key)) for key in path)
    return None


def non_finite_error(what: str, step: int, state: TrainState, learning_rate: float,
                     last_checkpoint: Optional[int]) -> NonFiniteLossError:
    """One line: what became non-finite and where, which checkpoint survives, and what to look at."""
    leaf = first_non_finite_leaf(state)
    where = f"first non-finite leaf {leaf}" if leaf else "every parameter and BatchNorm statistic is still finite"
    kept = (f"the checkpoint at step {last_checkpoint} is kept and the same command resumes from it"
            if last_checkpoint is not None else "no checkpoint had been saved yet")
    advice = (f"lower the learning rate ({learning_rate:.3g} at that step) or check the data"
              if learning_rate >= SMALL_LEARNING_RATE else
              f"the learning rate was only {learning_rate:.3g}, so check the data and the model's numerics")
    return NonFiniteLossError(f"{what} at step {step} ({where}); {kept}; {advice}")


def _mean_metrics(history: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    keys = history[0][1].keys()
    out = {k: float(np.mean([m[k] for _, m in history])) for k in keys if k != "learning_rate"}
    out["learning_rate"] = history[-1][1]["learning_rate"]
    return out


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs (the previous handler is restored after it).

    Under ``jax.distributed`` JAX's preemption sync manager owns SIGTERM (it agrees a step with every process,
    see :func:`_preempted`), so no handler is installed there, nor outside the main thread.
    """
    event = threading.Event()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def _preempted(manager, step: int, sigterm: threading.Event) -> bool:
    """True at the step where the run should save and stop: SIGTERM seen (one process), or the step all
    processes agreed on through JAX's preemption sync point (``reached_preemption``, several processes)."""
    if jax.process_count() > 1:
        return manager.reached_preemption(step)
    return sigterm.is_set()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run: Optional[Run] = None
                       ) -> dict[str, float]:
    """Trains (resuming from ``workdir``'s latest checkpoint if any), evaluates, checkpoints; returns the last
    eval metrics."""
    run = run or prepare(config)
    with _sigterm_flag() as sigterm, checkpoints.save_errors_in_one_line():
        return _train_and_evaluate(config, workdir, run, sigterm)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run: Run, sigterm: threading.Event
                        ) -> dict[str, float]:
    is_lead = jax.process_index() == 0
    previous = check_workdir(config, workdir)
    if previous is not None and int(previous["step"]) >= run.num_steps:
        if is_lead:
            print(f"the run in {workdir} is finished: its checkpoint is at step {previous['step']} and the config "
                  f"plans {run.num_steps} steps; nothing to do (raise num_train_steps or num_epochs to train on)",
                  flush=True)
        return last_eval_metrics(workdir)
    if is_lead:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    writer = MetricsWriter(workdir, enabled=is_lead)
    manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints)

    init, abstract_state = _init_state(run)
    restored = checkpoints.restore_latest(manager, abstract_state)
    if restored is None:
        state, start_step = init(jax.random.key(config.seed)), 0
    else:
        state, meta = restored
        start_step = int(meta["step"])
        if is_lead:
            print(f"resuming from the checkpoint at step {start_step} in {workdir}", flush=True)

    replicated, batch_sharding = sharding.replicated(run.mesh), sharding.batch_sharded(run.mesh)
    train_step = jax.jit(
        steps.make_train_step(run.model, run.tx, run.schedule, label_smoothing=config.label_smoothing,
                              grad_accum_steps=config.grad_accum_steps),
        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated), donate_argnums=0)
    eval_step = jax.jit(steps.make_eval_step(run.model), in_shardings=(replicated, batch_sharding),
                        out_shardings=replicated)
    all_finite = jax.jit(_all_finite, in_shardings=(replicated,), out_shardings=replicated)

    batches: Iterator[dict[str, np.ndarray]] = iter(data.train_batches(
        config.dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(), data_dir=config.data_dir,
        cache=config.cache))

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    history: list[tuple[int, dict[str, float]]] = []
    eval_metrics: dict[str, float] = {}
    progress = tqdm.tqdm(total=run.num_steps, initial=start_step, disable=not is_lead, desc="train",
                         unit="step", dynamic_ncols=True)
    timer_start, timer_steps = time.perf_counter(), 0
    compile_seconds: Optional[float] = None

    def last_checkpoint() -> Optional[int]:
        manager.wait_until_finished()
        return manager.latest_step()

    def drain() -> None:
        history.extend((s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending))
        pending.clear()
        for s, m in history:
            if not math.isfinite(m["train_loss"]):
                raise non_finite_error(f"the training loss is {m['train_loss']}", s, state, m["learning_rate"],
                                       last_checkpoint())

    save_failed = False
    try:
        if _preempted(manager, start_step, sigterm):
            if is_lead:
                print(f"preempted before step {start_step + 1}: nothing new to save", flush=True)
            return eval_metrics
        for step in range(start_step + 1, run.num_steps + 1):
            state, metrics = train_step(state, sharding.global_batch(next(batches), batch_sharding))
            pending.append((step, metrics))
            timer_steps += 1
            if step == start_step + 1:  # the first step compiles: time the steps after it
                jax.block_until_ready(metrics)
                compile_seconds = time.perf_counter() - timer_start
                timer_start, timer_steps = time.perf_counter(), 0
            progress.update(1)
            last = step == run.num_steps
            stop = not last and _preempted(manager, step, sigterm)
            if step % config.log_every_steps == 0 or last or stop:
                drain()
                elapsed = time.perf_counter() - timer_start
                summary = _mean_metrics(history)
                if timer_steps:
                    summary["steps_per_second"] = timer_steps / elapsed
                    summary["examples_per_second"] = timer_steps * config.batch_size / elapsed
                if compile_seconds is not None:
                    summary["first_step_seconds"], compile_seconds = compile_seconds, None
                writer.write(step, summary)
                progress.set_postfix(loss=f"{summary['train_loss']:.3f}", acc=f"{summary['train_accuracy']:.3f}")
                history.clear()
            if step % config.checkpoint_every_steps == 0 or last or stop:
                drain()
                if not bool(all_finite(state)):
                    raise non_finite_error("parameters or BatchNorm statistics are not finite", step, state,
                                           float(run.schedule(step - 1)), last_checkpoint())
                try:
                    checkpoints.save(manager, state, _run_meta(run, step))
                except checkpoints.CheckpointError:
                    save_failed = True
                    raise
            if stop:
                if is_lead:
                    progress.write(f"preempted: saved a checkpoint at step {step} in {workdir}; run the same "
                                   "command to continue")
                break
            if step % config.eval_every_steps == 0 or last:
                eval_metrics = evaluate(run, eval_step, state)
                writer.write(step, eval_metrics)
                progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                            for k, v in eval_metrics.items()))
            if step % config.log_every_steps == 0 or last or stop:
                timer_start, timer_steps = time.perf_counter(), 0
    finally:
        progress.close()
        writer.close()
        if not save_failed:  # after a failed save Orbax's manager can wait minutes for signals that never come
            checkpoints.finish(manager)
    return eval_metrics
