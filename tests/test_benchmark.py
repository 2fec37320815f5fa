"""benchmark.py on a narrow network: the JSON report's keys, its parameter count, and the README table."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmark
from attn_flax import models

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


def test_table_has_a_row_per_attention_with_the_overhead(capsys):
    benchmark.main([*TINY, "--table", "--models=resnet18", "--attention=none,cbam", "--flops_image_size=16",
                    "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["attention"]) for r in rows] == [("resnet18", "none"), ("resnet18", "cbam")]
    assert [r["params"] for r in rows] == [tiny_param_count(None), tiny_param_count("cbam")]
    assert rows[0]["overhead"] == 0 and rows[1]["overhead"] == rows[1]["train_step_ms"] / rows[0]["train_step_ms"] - 1
    text = benchmark.format_table(rows, benchmark.parse_args([*TINY, "--table", "--flops_image_size=16"]))
    assert text.count("\n") == 3 and "| resnet18 | cbam |" in text
