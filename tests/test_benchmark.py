"""benchmark.py on a narrow network: the JSON report's keys, its parameter count, its FLOPs (XLA's count of the
native lowering), the trainer's step, and the README table."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmark
from flax import linen as nn

from attn_flax import models, ops
from attn_flax.training import steps

TINY = ["--model=resnet18", "--stem=cifar", "--batch_size=4", "--image_size=16", "--steps=1",
        "--widths=8,16,16,16", "--stage_sizes=1,1,1,1", "--eval_batches=1"]


def tiny_param_count(attention):
    model = models.create_model("resnet18", num_classes=10, stem="cifar", attention=attention).clone(
        widths=(8, 16, 16, 16), stage_sizes=(1, 1, 1, 1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_json_report(capsys):
    benchmark.main([*TINY, "--attention=cbam,none", "--steps=3", "--json"])
    result = json.loads(capsys.readouterr().out)
    for key in ("params", "gflops", "gmacs", "train_step_ms", "compile_s", "eval_images_per_s", "peak_rss_mb"):
        assert key in result and result[key] > 0, key
    assert result["params"] == tiny_param_count("cbam")
    assert result["gmacs"] == result["gflops"] / 2
    assert set(result["step_ms"]) == {"flax[cbam,auto]", "flax[none,auto]"}
    assert list(result["overhead_vs_none"]) == ["flax[cbam,auto]"]
    overhead = result["overhead_vs_none"]["flax[cbam,auto]"]
    assert overhead["q25"] <= overhead["median"] <= overhead["q75"]


def test_paired_ratios_are_quartiles_of_per_round_ratios():
    assert benchmark.paired_ratios([2.0, 4.0, 6.0, 9.0], [1.0, 2.0, 2.0, 3.0]) == {
        "median": 2.5, "q25": 2.0, "q75": 3.0}
    with pytest.raises(ValueError, match="equally many steps"):
        benchmark.paired_ratios([1.0, 2.0], [1.0])


def test_text_report_shows_paired_overhead_and_ratio():
    result = {"model": "resnet18", "stem": "cifar", "batch_size": 8, "image_size": 16, "platform": "cpu",
              "jax": "0", "params": 1, "attention": "none", "gflops": 1.0, "gmacs": 0.5, "compile_s": 1.0,
              "eval_images_per_s": 1.0, "peak_rss_mb": 1.0, "steps": 4, "torch": "2", "torch_device": "cpu",
              "step_ms": {"flax[none,auto]": 100.0, "flax[cbam,auto]": 108.0},
              "step_ms_min": {"flax[none,auto]": 90.0, "flax[cbam,auto]": 99.0},
              "ratio_vs_torch": {"flax[cbam,auto]": 0.96},
              "paired_ratio_vs_torch": {"flax[cbam,auto]": {"median": 0.95, "q25": 0.9, "q75": 1.02}},
              "overhead_vs_none": {"flax[cbam,auto]": {"median": 0.08, "q25": 0.03, "q75": 0.12}}}
    cbam_line = next(line for line in benchmark.format_text(result).splitlines() if "flax[cbam,auto]" in line)
    assert "0.96x torch (paired 0.90-1.02)" in cbam_line and "+8.0% vs none (+3.0 to +12.0)" in cbam_line


@pytest.mark.heavy
def test_table_has_a_row_per_attention_with_the_overhead(capsys):
    benchmark.main([*TINY, "--table", "--models=resnet18", "--attention=none,cbam", "--flops_image_size=16",
                    "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["attention"]) for r in rows] == [("resnet18", "none"), ("resnet18", "cbam")]
    assert [r["params"] for r in rows] == [tiny_param_count(None), tiny_param_count("cbam")]
    assert rows[0]["overhead"] == 0 and rows[1]["overhead"] == rows[1]["train_step_ms"] / rows[0]["train_step_ms"] - 1
    text = benchmark.format_table(rows, benchmark.parse_args([*TINY, "--table", "--flops_image_size=16"]))
    assert text.count("\n") == 3 and "| resnet18 | cbam |" in text


def _xla_count(model, variables, image_size):
    """XLA's count for the model lowered with --conv=xla, compiled for the CPU (the test's own lowering)."""
    x = jnp.zeros((1, image_size, image_size, 3))
    with ops.default_impl("xla"):
        compiled = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_flops_are_xlas_count_of_the_native_lowering():
    """Not the CPU paths' count: 3x3 convs of 16 channels take Winograd's products on CPU, 2.25x fewer."""
    args = benchmark.parse_args([*TINY, "--widths=16,16,16,16", "--attention=cbam"])
    model, variables = benchmark._build(args, "cbam")
    with ops.default_impl("auto"):  # a cached auto trace must not leak into the count
        auto = jax.jit(functools.partial(model.apply, train=False)).lower(variables, jnp.zeros((1, 16, 16, 3)))
    auto_cost = auto.compile().cost_analysis()
    auto_flops = (auto_cost[0] if isinstance(auto_cost, (list, tuple)) else auto_cost)["flops"]
    flops = benchmark.forward_flops(model, variables, 16)
    assert flops == _xla_count(model, variables, 16)
    assert flops == _xla_count(model.clone(conv=nn.Conv), variables, 16)  # Flax's own conv: the same HLO
    assert auto_flops < 0.95 * flops
    abstract = jax.eval_shape(lambda: variables)
    assert benchmark.forward_flops(model, abstract, 16) == flops  # shapes are enough


def test_the_runner_times_the_trainers_step(monkeypatch):
    """One train step in the codebase: the benchmark compiles training.steps.make_train_step."""
    made = []
    monkeypatch.setattr(steps, "make_train_step", lambda *a, **k: made.append(a) or steps_make(*a, **k))
    args = benchmark.parse_args(TINY)
    model, variables = benchmark._build(args, "none")
    images, labels = benchmark.make_batch(4, 16, 10)
    runner = benchmark.FlaxRunner(model, variables, "auto", images, labels)
    assert len(made) == 1 and made[0][0] is model
    runner.times.append(runner.step())
    assert int(runner.state.step) == 1 and runner.times[0] > 0
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), runner.state.params, variables["params"])
    assert all(jax.tree.leaves(changed))


steps_make = steps.make_train_step
