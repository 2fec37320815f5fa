"""Writes ``notebooks/quickstart.ipynb`` (outputs stripped): ``python notebooks/build_quickstart.py``.

The notebook is generated so that its cells stay reviewable as Python; edit the cells here, rerun, commit both.
``tests/test_notebook.py`` executes it with ``ATTN_FLAX_NOTEBOOK_TINY=1``.
"""
import pathlib

import nbformat
from nbformat import v4

CELLS = [
    ("markdown", """\
# attn_flax quickstart: a CBAM ResNet in JAX/Flax

This notebook builds a ResNet with CBAM attention (Woo et al., ECCV 2018), initialises and applies it as pure
functions, trains it for a few steps on the offline `attn_flax_shapes` dataset (generated locally, no download)
with the package's own train step, scores it over the whole eval split, and draws where it attends: the spatial
attention map of every stage, read from the model's `intermediates`, and Grad-CAM of the last stage.

Everything runs on a CPU in a few minutes; a GPU or TPU runtime is faster but not needed."""),
    ("code", """\
# On Colab, install the package first: set REPO_URL to the git URL of your copy of the attn_flax repository
# (elsewhere: `pip install -e .` in a clone, then start Jupyter from the clone's root).
import sys

REPO_URL = ""  # e.g. "https://github.com/<you>/attn_flax"
if "google.colab" in sys.modules:
    if not REPO_URL:
        raise ValueError("set REPO_URL in this cell to the git URL of the attn_flax repository")
    get_ipython().run_line_magic("pip", f"install -q git+{REPO_URL}")"""),
    ("markdown", """\
## Settings

The defaults suit a Colab CPU runtime (a few minutes). The test suite sets `ATTN_FLAX_NOTEBOOK_TINY=1` to run
the same cells on a tiny model and dataset in seconds."""),
    ("code", """\
import os

TINY = os.environ.get("ATTN_FLAX_NOTEBOOK_TINY") == "1"
DATA_DIR = os.environ.get("ATTN_FLAX_NOTEBOOK_DATA_DIR")  # None: TFDS's default (~/tensorflow_datasets)
DATASET = "attn_flax_shapes/tiny" if TINY else "attn_flax_shapes"
WIDTHS = (8, 16, 16, 16) if TINY else (16, 32, 64, 128)
STAGE_SIZES = (1, 1, 1, 1)
BATCH_SIZE = 16 if TINY else 128
TRAIN_STEPS = 3 if TINY else 300
EVAL_BATCH_SIZE = 32 if TINY else 256"""),
    ("markdown", """\
## The dataset

`attn_flax_shapes`: 10 shape classes drawn at a random place and scale among distractors in 32x32 scenes, so
that *where* the network looks matters. It is generated on first use (no download)."""),
    ("code", """\
import jax
import jax.numpy as jnp
import numpy as np

from attn_flax import data, models, visualization
from attn_flax.training import evaluation, optim, steps
from attn_flax.training.state import init_train_state

info = data.dataset_info(DATASET, data_dir=DATA_DIR)
print(f"{info.name}: {info.num_train_examples} train / {info.num_eval_examples} eval images of "
      f"{info.image_size}x{info.image_size}, classes {', '.join(info.class_names)}")
print("devices:", jax.devices())"""),
    ("markdown", """\
## Build a CBAM ResNet

`create_model` takes a depth, an attention name (`'cbam'`, `'bam'`, `'se'`, `'eca'` or `None`) and the stem;
CBAM goes into every residual block. `clone` narrows it here so that it trains quickly on a CPU."""),
    ("code", """\
model = models.create_model("resnet18", num_classes=info.num_classes, attention="cbam", stem="cifar")
model = model.clone(widths=WIDTHS, stage_sizes=STAGE_SIZES)

images = jnp.zeros((1, info.image_size, info.image_size, 3))
variables = model.init(jax.random.key(0), images, train=False)  # a pure function: key + shapes -> variables
print("collections:", list(variables))
print("parameters:", sum(x.size for x in jax.tree.leaves(variables["params"])))
print("CBAM in the first block:")
for path, value in jax.tree_util.tree_flatten_with_path(variables["params"]["stage1_block0"]["attention"])[0]:
    print("  ", jax.tree_util.keystr(path), value.shape)"""),
    ("markdown", """\
`apply` is also a pure function of the variables. With `mutable=['intermediates']` it returns what the attention
modules sow: CBAM's channel gate `[N, 1, 1, C]` and spatial gate `[N, H, W, 1]` of every block."""),
    ("code", """\
logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
print("logits:", logits.shape)
for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    print("  ", jax.tree_util.keystr(path), value.shape)"""),
    ("markdown", """\
## Attention in a network of your own

`models.with_attention` puts a registered attention after the submodules a rule picks (path patterns such as
`'Block_*'` or `'*/bn'`, module classes, or a predicate) without editing the network's code. The network keeps its
parameter names; the attention's go under `params['attention'][path]`."""),
    ("code", """\
from flax import linen as nn


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train)(x))


class TinyNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        x = Block(16)(x, train)
        x = Block(32)(x, train)
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


tiny = models.with_attention(TinyNet(info.num_classes), "cbam", after="Block_*", reduction=4)
tiny_variables = tiny.init(jax.random.key(0), images)
print("params:", list(tiny_variables["params"]), "| attention at:", list(tiny_variables["params"]["attention"]))
print("logits:", tiny.apply(tiny_variables, images).shape)"""),
    ("markdown", """\
## Train a few steps

The training state is one pytree (step, params, BatchNorm statistics, optimiser state, RNG key); a train step
is a pure function `(state, batch) -> (state, metrics)`, jitted here. The optimiser is the papers' SGD with
momentum and weight decay (`attn_flax.training.optim`)."""),
    ("code", """\
import ml_collections

config = ml_collections.ConfigDict(dict(
    base_learning_rate=0.4, batch_size=BATCH_SIZE, schedule="cosine", warmup_epochs=0.2, decay_epochs=(),
    decay_factor=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, weight_decay_exclude_norm_and_bias=False))
steps_per_epoch = info.num_train_examples / BATCH_SIZE
schedule = optim.learning_rate_schedule(config, TRAIN_STEPS, steps_per_epoch)
tx = optim.create_optimizer(config, schedule)

state = init_train_state(model, tx, jax.random.key(0), (info.image_size, info.image_size, 3))
train_step = jax.jit(steps.make_train_step(model, tx, schedule))
batches = data.train_batches(DATASET, global_batch_size=BATCH_SIZE, seed=0, data_dir=DATA_DIR)
for step, batch in zip(range(1, TRAIN_STEPS + 1), batches):
    state, metrics = train_step(state, batch)
    if step % max(TRAIN_STEPS // 10, 1) == 0 or step == TRAIN_STEPS:
        print(f"step {step}: loss {float(metrics['train_loss']):.3f}, accuracy {float(metrics['train_accuracy']):.3f}")"""),
    ("markdown", """\
## Score it over the whole eval split

Every example counts exactly once (the last batch is padded with masked examples), as `python eval.py` does."""),
    ("code", """\
trained = {"params": state.params, "batch_stats": state.batch_stats}
scores = evaluation.evaluate(model, trained, DATASET, batch_size=EVAL_BATCH_SIZE, data_dir=DATA_DIR)
scores"""),
    ("markdown", """\
## Where does it attend?

The spatial attention map of each stage (for a stage with several blocks, the mean of their maps) comes out of
`intermediates`; Grad-CAM of the last stage is computed for the predicted class. Both are upsampled to the
image size and overlaid. `python visualize.py --workdir=DIR --baseline_workdir=DIR --output=DIR` draws the same
figure for a trained run next to a model without attention."""),
    ("code", """\
import io

from IPython.display import Image, display

eval_batch = next(iter(data.eval_batches(DATASET, global_batch_size=4, data_dir=DATA_DIR)))
view = visualization.explain(model, trained, eval_batch["image"], size=info.image_size)
pictures = visualization.denormalise(eval_batch["image"], info.mean, info.std)
for i in range(2):
    row = visualization.Explanation(f"CBAM: {info.class_names[view.predictions[i]]}",
                                    {label: m[i] for label, m in view.maps.items()}, view.grad_cam[i])
    fig = visualization.figure(pictures[i], [row], title=f"true: {info.class_names[eval_batch['label'][i]]}")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    display(Image(png.getvalue()))"""),
]


def build() -> nbformat.NotebookNode:
    """The quickstart notebook, without outputs."""
    notebook = v4.new_notebook()
    notebook.cells = [v4.new_markdown_cell(text, id=f"cell-{i:02d}") if kind == "markdown"
                      else v4.new_code_cell(text, id=f"cell-{i:02d}") for i, (kind, text) in enumerate(CELLS)]
    notebook.metadata.update({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })
    return notebook


if __name__ == "__main__":
    path = pathlib.Path(__file__).resolve().parent / "quickstart.ipynb"
    nbformat.write(build(), path)
    print(f"wrote {path}")
