"""Benchmark a model: parameters, forward FLOPs, compile time, training step time, eval throughput, memory.

    python benchmark.py --model=resnet18 --stem=cifar --attention=cbam --batch_size=128 --image_size=32 --steps=5
    python benchmark.py ... --conv=xla,auto --vs-torch       # before/after and PyTorch, interleaved in one run
    python benchmark.py ... --json                           # one JSON object on stdout
    python benchmark.py --table --models=resnet18,resnet50 --stem=imagenet --batch_size=16 --image_size=64
                                                            # the README's markdown table: params and GMACs at
                                                            # 224 for every attention, step-time overhead

The training step is the trainer's own (``attn_flax.training.steps.make_train_step``): forward in train mode
(BatchNorm batch statistics), softmax cross entropy, backward, SGD with momentum 0.9 at a constant learning rate
0.1, on one fixed random batch, the state donated as in training. ``--conv`` lists convolution
backward implementations (``attn_flax.ops.IMPLS``: 'auto' picks matrix-product gradients on CPU, 'xla' is XLA's
native path, i.e. the behaviour of ``nn.Conv``); ``--vs-torch`` adds the same architecture in PyTorch
(``tests/torch_reference.py``, imported from the repository's tests directory only when asked; needs torch),
with the same optimiser and ``torch.set_num_threads`` set to the JAX process's core count; when JAX runs on a
GPU, PyTorch runs on CUDA too, channels-last (NHWC, as XLA lays out GPU convolutions), synchronised after each
step. Step times are measured round-robin, an untimed and a timed step of each variant in turn, so that load from
other processes on the machine affects every variant alike; the median over ``--steps`` is reported. With
``none`` among several attentions, each other attention's step-time overhead over it, and with ``--vs-torch``
each Flax variant's ratio to PyTorch, also come as the quartiles of the per-round ratios ("paired"): on a noisy
machine they say whether a difference of a few percent is real.

FLOPs are XLA's count (cost analysis) of the eval forward pass at batch 1 with XLA's native convolutions
(``--conv=xla``), compiled for the CPU on every host, so they describe the model and not the kernels chosen for
this machine: the CPU paths of ``ops.Conv`` (Winograd's F(2x2, 3x3) takes 2.25x fewer multiplies) would lower
ResNet-50 + CBAM at 224 from 8.10 to 6.83 GFLOPs. A multiply-add counts 2; MACs (``gmacs``) are half. Peak memory
is the process's peak resident set size (CPU has no allocator statistics), so it covers everything the run built,
PyTorch included when ``--vs-torch`` is given.
"""
import argparse
import functools
import json
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attn_flax import attention as attention_lib
from attn_flax import models, ops
from attn_flax.training import steps
from attn_flax.training.state import TrainState

LEARNING_RATE = 0.1
TORCH_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=models.available())
    p.add_argument("--stem", default=None, choices=models.STEMS,
                   help="default: cifar, or the model's own for a CIFAR- or ImageNet-only network (models.STEM_OF)")
    p.add_argument("--attention", default="none",
                   help="a registered attention name or 'none'; a comma-separated list times each in the same run")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="computation dtype (parameters stay float32)")
    p.add_argument("--num_classes", type=int, default=None, help="default: 10 (cifar stem) or 1000 (imagenet)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant (after one warm-up)")
    p.add_argument("--eval_batches", type=int, default=3)
    p.add_argument("--conv", default="auto",
                   help=f"comma-separated conv backward implementations to time, of {', '.join(ops.IMPLS)}")
    p.add_argument("--vs-torch", dest="vs_torch", action="store_true",
                   help="also time the same architecture in PyTorch and print the ratios")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--table", action="store_true",
                   help="sweep --models x --attention (default: all registered) and print a markdown table")
    p.add_argument("--models", default="resnet18,resnet50", help="the models --table sweeps")
    p.add_argument("--flops_image_size", type=int, default=224, help="image side for --table's params/GMACs")
    p.add_argument("--widths", default=None, help="comma-separated stage widths (a narrower test network)")
    p.add_argument("--stage_sizes", default=None, help="comma-separated blocks per stage")
    args = p.parse_args(argv)
    if args.table and args.attention == "none":
        args.attention = ",".join(["none", *attention_lib.available()])
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.overrides = {k: tuple(int(v) for v in getattr(args, k).split(","))
                      for k in ("widths", "stage_sizes") if getattr(args, k)}
    args.convs = [c.strip() for c in args.conv.split(",") if c.strip()]
    args.attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    args.attention = args.attentions[0]
    unknown = [c for c in args.convs if c not in ops.IMPLS]
    if unknown or not args.convs:
        p.error(f"--conv {args.conv!r}: each entry must be one of {', '.join(ops.IMPLS)}")
    if args.stem is None:
        args.stem = models.STEM_OF.get(args.model, "cifar")
    if args.num_classes is None:
        args.num_classes = 10 if args.stem == "cifar" else 1000
    if args.vs_torch and args.model not in TORCH_DEPTHS:
        p.error(f"--vs-torch supports {', '.join(TORCH_DEPTHS)}, not {args.model}")
    return args


def make_batch(batch_size: int, image_size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random NHWC float32 batch and integer labels."""
    rng = np.random.RandomState(0)
    images = rng.randn(batch_size, image_size, image_size, 3).astype(np.float32)
    return images, rng.randint(0, num_classes, size=batch_size).astype(np.int32)


class FlaxRunner:
    """One Flax training state and its compiled step (the trainer's), for one conv implementation."""

    def __init__(self, model: Any, variables: dict, impl: str, images: np.ndarray, labels: np.ndarray,
                 label: str = ""):
        self.name = f"flax[{label}{impl}]"
        tx = optax.sgd(LEARNING_RATE, momentum=0.9)
        params = jax.tree_util.tree_map(jnp.copy, variables["params"])
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                batch_stats=jax.tree_util.tree_map(jnp.copy, variables.get("batch_stats", {})),
                                opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
        self.batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
        step = steps.make_train_step(model, tx, optax.constant_schedule(LEARNING_RATE))
        start = time.perf_counter()
        with ops.default_impl(impl):  # a fresh jit per runner: the impl is read when the step is traced
            self.compiled = jax.jit(step, donate_argnums=0).lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        metrics["train_loss"].block_until_ready()
        return time.perf_counter() - start


class TorchRunner:
    """The same architecture in PyTorch (tests/torch_reference.py), SGD momentum 0.9, cross entropy."""

    def __init__(self, args: argparse.Namespace, attention: str, images: np.ndarray, labels: np.ndarray,
                 threads: int, label: str = ""):
        import torch
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "tests"))
        import torch_reference

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch_device(torch)
        self.model = torch_reference.ResNet(TORCH_DEPTHS[args.model], args.stem, args.num_classes,
                                            attention=None if attention == "none" else attention).train()
        self.model.to(self.device)
        if self.device == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=0.9)
        self.images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(self.device)
        if self.device == "cuda":
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.name = f"torch[{label.rstrip(',')}]" if label else "torch"
        self.params = torch_reference.count_parameters(self.model)
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        self.opt.step()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - start


def torch_device(torch: Any) -> str:
    """'cuda' when JAX runs on a GPU and PyTorch sees one (NHWC there, as XLA's GPU convolutions), else 'cpu'."""
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def time_round_robin(runners: list[Any], steps: int) -> None:
    """``steps`` rounds; in each, every runner takes an untimed step and then a timed one (``runner.times``).

    Round-robin spreads load from other processes over every variant alike; the untimed step before each timed
    one keeps the previous variant's threads out of the measurement (PyTorch's OpenMP workers spin for a while
    after their last parallel region, and a spinning worker takes a core from the next variant's first step).
    """
    for _ in range(steps):
        for r in runners:
            r.step()
            r.times.append(r.step())


def paired_ratios(times: list[float], reference: list[float]) -> dict:
    """Median and quartiles of the per-round ratios ``times[i] / reference[i]``.

    Round-robin timing pairs the i-th step of every variant in time, so a slow moment of the machine slows both
    members of a pair; the spread of the paired ratios says whether a difference of a few percent is real (the
    quartiles exclude 1.0) or inside the noise, which the ratio of two medians cannot say.
    """
    if len(times) != len(reference) or not times:
        raise ValueError(f"paired_ratios needs equally many steps, got {len(times)} and {len(reference)}")
    q25, median, q75 = np.percentile(np.asarray(times) / np.asarray(reference), [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75)}


def forward_flops(model: Any, variables: Any, image_size: int) -> float:
    """FLOPs of one image's eval forward pass (a multiply-add counts 2) as XLA counts the model lowered with its
    native convolutions (``ops.default_impl('xla')``, what ``--conv=xla`` times), compiled for the CPU.

    The same count on every host: the CPU compiler's analysis (a GPU executable's leaves out its cuDNN calls), of
    the native lowering (the CPU paths of ``ops.Conv`` would count Winograd's products instead of the model's).
    ``variables`` may be arrays or shapes. NaN without a CPU backend (``JAX_PLATFORMS`` leaving out ``cpu``).
    """
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:
        return float("nan")
    on_cpu = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu)  # noqa: E731
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32, sharding=cpu)
    with ops.default_impl("xla"):  # a fresh jit: a trace cached under another impl would be reused otherwise
        lowered = jax.jit(functools.partial(model.apply, train=False)).lower(jax.tree.map(on_cpu, variables), x)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def eval_throughput(model: Any, variables: dict, images: np.ndarray, batches: int) -> float:
    """Eval-mode images per second at the benchmark batch size (median over ``batches``)."""
    apply = jax.jit(functools.partial(model.apply, train=False))
    x = jnp.asarray(images)
    apply(variables, x).block_until_ready()
    times = []
    for _ in range(max(1, batches)):
        start = time.perf_counter()
        apply(variables, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(times)


def count_params(variables: dict) -> int:
    """Trainable parameters (the ``params`` collection; BatchNorm statistics excluded, as the papers count)."""
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(variables["params"])))


def _build(args: argparse.Namespace, attention: str, image_size: Optional[int] = None,
           abstract: bool = False) -> tuple[Any, dict]:
    """The model and its variables (their shapes only with ``abstract``: enough for parameters and FLOPs)."""
    model = models.create_model(args.model, num_classes=args.num_classes, stem=args.stem, dtype=jnp.dtype(args.dtype),
                                attention=attention)
    if args.overrides:
        model = model.clone(**args.overrides)
    side = image_size or args.image_size
    init = functools.partial(model.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, 3)), train=False)
    return model, jax.eval_shape(init) if abstract else init()


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark and returns its results as a dict (the ``--json`` object).

    The summary fields (params, FLOPs, compile time, eval throughput, ``train_step_ms``) are those of the first
    attention and the first conv implementation; ``step_ms`` holds every variant's median step time.
    """
    images, labels = make_batch(args.batch_size, args.image_size, args.num_classes)
    several = len(args.attentions) > 1
    by_variant: dict[tuple[str, str], Any] = {}  # (attention, conv impl or 'torch') -> runner, in timing order
    for attention in args.attentions:
        label = f"{attention}," if several else ""
        model, variables = _build(args, attention)
        for impl in args.convs:
            by_variant[(attention, impl)] = FlaxRunner(model, variables, impl, images, labels, label)
        if args.vs_torch:
            by_variant[(attention, "torch")] = TorchRunner(args, attention, images, labels, os.cpu_count() or 1, label)
    runners = list(by_variant.values())
    model, variables = _build(args, args.attentions[0])
    flops = forward_flops(model, variables, args.image_size)
    time_round_robin(runners, args.steps)
    step_ms = {r.name: 1e3 * statistics.median(r.times) for r in runners}
    step_ms_min = {r.name: 1e3 * min(r.times) for r in runners}
    primary = runners[0]
    result = {
        "model": args.model, "stem": args.stem, "attention": args.attention, "batch_size": args.batch_size,
        "image_size": args.image_size, "dtype": args.dtype, "platform": jax.default_backend(), "jax": jax.__version__,
        "params": count_params(variables), "gflops": flops / 1e9, "gmacs": flops / 2e9,
        "compile_s": primary.compile_s, "train_step_ms": step_ms[primary.name],
        "eval_images_per_s": eval_throughput(model, variables, images, args.eval_batches),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": args.steps, "step_ms": step_ms, "step_ms_min": step_ms_min,
        "compile_s_by_conv": {r.name: r.compile_s for r in runners if isinstance(r, FlaxRunner)},
    }
    if several and "none" in args.attentions:
        result["overhead_vs_none"] = {
            r.name: {k: v - 1 for k, v in paired_ratios(r.times, by_variant[("none", kind)].times).items()}
            for (attention, kind), r in by_variant.items() if attention != "none"}
    if args.vs_torch:
        import torch

        result["torch"] = torch.__version__
        result["torch_device"] = torch_device(torch)
        result["torch_params"] = next(r.params for r in runners if isinstance(r, TorchRunner))
        result["ratio_vs_torch"], result["paired_ratio_vs_torch"] = {}, {}
        for (attention, kind), r in by_variant.items():
            if kind != "torch":
                torch_runner = by_variant[(attention, "torch")]
                result["ratio_vs_torch"][r.name] = step_ms[r.name] / step_ms[torch_runner.name]
                result["paired_ratio_vs_torch"][r.name] = paired_ratios(r.times, torch_runner.times)
    return result


def format_text(result: dict) -> str:
    """The human-readable report."""
    lines = [
        f"{result['model']} stem={result['stem']} batch={result['batch_size']} "
        f"image={result['image_size']} ({result['platform']}, jax {result['jax']})",
        f"  params            {result['params']:,} (attention={result['attention']})",
        f"  forward           {result['gflops']:.3f} GFLOPs/image ({result['gmacs']:.3f} GMACs; XLA's count, "
        "native convs)",
        f"  compile           {result['compile_s']:.1f} s",
        f"  eval              {result['eval_images_per_s']:.0f} images/s",
        f"  peak RSS          {result['peak_rss_mb']:.0f} MiB",
        f"  train step (median and fastest of {result['steps']}, round-robin):",
    ]
    if "torch" in result:
        lines.insert(-1, f"  torch             {result['torch']} on {result['torch_device']}")
    for name, ms in result["step_ms"].items():
        line = f"    {name:<20} {ms:9.1f} ms (min {result['step_ms_min'][name]:7.1f})"
        if name in result.get("ratio_vs_torch", {}):
            paired = result["paired_ratio_vs_torch"][name]
            line += f"   {result['ratio_vs_torch'][name]:.2f}x torch (paired {paired['q25']:.2f}-{paired['q75']:.2f})"
        if name in result.get("overhead_vs_none", {}):
            pct = {k: 100 * v for k, v in result["overhead_vs_none"][name].items()}
            line += f"   {pct['median']:+.1f}% vs none ({pct['q25']:+.1f} to {pct['q75']:+.1f})"
        lines.append(line)
    if "overhead_vs_none" in result or "paired_ratio_vs_torch" in result:
        lines.append("  (paired: quartiles of the per-round ratios; an interval that contains 1.0x or 0% is noise)")
    return "\n".join(lines)


PAPER_PARAMS_M = {  # ImageNet, 1000 classes (CBAM paper Table 4, BAM paper Table 5)
    ("resnet18", "none"): 11.69, ("resnet18", "se"): 11.78, ("resnet18", "cbam"): 11.78,
    ("resnet34", "none"): 21.80, ("resnet34", "se"): 21.96, ("resnet34", "cbam"): 21.96,
    ("resnet50", "none"): 25.56, ("resnet50", "se"): 28.09, ("resnet50", "cbam"): 28.09, ("resnet50", "bam"): 25.92,
    ("resnet101", "none"): 44.55, ("resnet101", "se"): 49.33, ("resnet101", "cbam"): 49.33,
}


def table(args: argparse.Namespace) -> list[dict]:
    """One row per model x attention: params and GMACs at ``--flops_image_size`` and the median train-step time
    at ``--batch_size``/``--image_size``, the attentions of one model timed round-robin in the same run."""
    rows = []
    for model_name in args.models:
        row_args = argparse.Namespace(**{**vars(args), "model": model_name})
        per_model = []
        for attention in args.attentions:
            model, variables = _build(row_args, attention, args.flops_image_size, abstract=True)
            flops = forward_flops(model, variables, args.flops_image_size)
            images, labels = make_batch(args.batch_size, args.image_size, args.num_classes)
            small_model, small_variables = _build(row_args, attention)
            runner = FlaxRunner(small_model, small_variables, args.convs[0], images, labels, f"{attention},")
            per_model.append(({"model": model_name, "attention": attention, "params": count_params(variables),
                               "gmacs": flops / 2e9, "compile_s": runner.compile_s}, runner))
        time_round_robin([r for _, r in per_model], args.steps)
        base_ms = None
        for row, runner in per_model:
            row["train_step_ms"] = 1e3 * statistics.median(runner.times)
            base_ms = row["train_step_ms"] if row["attention"] == "none" else base_ms
            row["overhead"] = row["train_step_ms"] / base_ms - 1 if base_ms else None
            row["paper_params_m"] = PAPER_PARAMS_M.get((model_name, row["attention"]))
            rows.append(row)
    return rows


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table for the README."""
    lines = [f"| model | attention | params | paper params | GMACs ({args.flops_image_size}px) | "
             f"train step ms (batch {args.batch_size}, {args.image_size}px) | step overhead |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = f"{r['paper_params_m']:.2f}M" if r["paper_params_m"] else ""
        overhead = f"{100 * r['overhead']:+.1f}%" if r["overhead"] is not None and r["attention"] != "none" else ""
        lines.append(f"| {r['model']} | {r['attention']} | {r['params'] / 1e6:.2f}M | {paper} | {r['gmacs']:.3f} | "
                     f"{r['train_step_ms']:.0f} | {overhead} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    ops.retain_freed_memory()
    if args.table:
        rows = table(args)
        print(json.dumps(rows) if args.json else format_table(rows, args))
        return
    result = run(args)
    print(json.dumps(result) if args.json else format_text(result))


if __name__ == "__main__":
    main()
