"""benchmark.py on a narrow network: the JSON report's keys, its parameter count, and the README table."""
import json

import jax
import jax.numpy as jnp
import numpy as np

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
    benchmark.main([*TINY, "--attention=cbam", "--json"])
    result = json.loads(capsys.readouterr().out)
    for key in ("params", "gflops", "gmacs", "train_step_ms", "compile_s", "eval_images_per_s", "peak_rss_mb"):
        assert key in result and result[key] > 0, key
    assert result["params"] == tiny_param_count("cbam")
    assert result["gmacs"] == result["gflops"] / 2


def test_table_has_a_row_per_attention_with_the_overhead(capsys):
    benchmark.main([*TINY, "--table", "--models=resnet18", "--attention=none,cbam", "--flops_image_size=16",
                    "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["attention"]) for r in rows] == [("resnet18", "none"), ("resnet18", "cbam")]
    assert [r["params"] for r in rows] == [tiny_param_count(None), tiny_param_count("cbam")]
    assert rows[0]["overhead"] == 0 and rows[1]["overhead"] == rows[1]["train_step_ms"] / rows[0]["train_step_ms"] - 1
    text = benchmark.format_table(rows, benchmark.parse_args([*TINY, "--table", "--flops_image_size=16"]))
    assert text.count("\n") == 3 and "| resnet18 | cbam |" in text
