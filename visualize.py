"""Pictures of where a trained network attends: ``python visualize.py --workdir=DIR --output=DIR``.

For each of the first ``--num_images`` eval images, one PNG (``OUTPUT/attention_000.png``, ...): the image, the
spatial attention map of every stage overlaid on it (CBAM: the mean over the stage's blocks; BAM: the map after
stages 1-3; SE/ECA have none) and Grad-CAM of the last stage for the predicted class (``--target=true``: the
true class). ``--baseline_workdir`` adds a second row for a model without attention, as in the CBAM paper's
figure. Both workdirs must have been trained on the same dataset. Exit codes: 0 done, 2 inputs that cannot be
drawn (one line on stderr), 1 no checkpoint could be read.
"""
import json

from absl import app, flags
from absl import logging as absl_logging

from attn_flax import cli, paths

PROGRAM = "visualize.py"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir of a model with attention.", required=True)
flags.DEFINE_string("baseline_workdir", None, "Optional training workdir of a model without attention.")
flags.DEFINE_string("output", None, "Directory for the PNG figures.", required=True)
flags.DEFINE_integer("num_images", 8, "How many eval images (the first ones of the split) to draw.")
flags.DEFINE_bool("upsample", True, "Upsample maps to the image size (bilinear); else show them at their own "
                  "resolution, stretched over the image.")
flags.DEFINE_enum("target", "predicted", ["predicted", "true"], "The class Grad-CAM explains.")
flags.DEFINE_integer("panel_size", 160, "Side of one panel of the figure, in pixels.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every command-line mistake reported in one line and exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        cli.fail(PROGRAM, f"{err}; see --helpfull")


def model_label(config) -> str:
    """'CBAM', 'BAM', ... or 'ResNet' for a run without attention."""
    attention = config.get("attention")
    if attention in (None, "none"):
        return "ResNet"
    return attention.rpartition(":")[2] if ":" in attention else attention.upper()


def draw() -> list[str]:
    """Loads the workdirs, explains the first images and writes one PNG per image; returns the paths."""
    import numpy as np

    from attn_flax import data, trained, visualization

    runs = [trained.from_workdir(FLAGS.workdir)]
    if FLAGS.baseline_workdir is not None:
        runs.append(trained.from_workdir(FLAGS.baseline_workdir))
        if runs[1].config.dataset != runs[0].config.dataset:
            raise trained.LoadError(f"the baseline was trained on {runs[1].config.dataset}, the model on "
                                    f"{runs[0].config.dataset}; compare runs on the same dataset")
    config = runs[0].config
    info = data.dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.get("image_size"))
    if not 0 < FLAGS.num_images <= info.num_eval_examples:
        raise ValueError(f"--num_images must be between 1 and {info.num_eval_examples} (the eval split's size)")
    batch = next(iter(data.eval_batches(config.dataset, global_batch_size=FLAGS.num_images,
                                        data_dir=config.data_dir, image_size=info.image_size)))
    classes = batch["label"] if FLAGS.target == "true" else None
    size = info.image_size if FLAGS.upsample else None
    views = [visualization.explain(run.model, run.variables, batch["image"], classes=classes, size=size)
             for run in runs]
    images = visualization.denormalise(batch["image"], info.mean, info.std)

    output = paths.resolve(FLAGS.output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(images):
        true = info.class_names[batch["label"][i]]
        rows = [visualization.Explanation(
            visualization.row_title(model_label(run.config), info.class_names[view.predictions[i]],
                                    float(view.probabilities[i]), true),
            {label: m[i] for label, m in view.maps.items()}, view.grad_cam[i]) for run, view in zip(runs, views)]
        fig = visualization.figure(np.asarray(image), rows, panel_pixels=FLAGS.panel_size)
        written.append(output / f"attention_{i:03d}.png")
        with written[-1].open("wb") as f:  # through epath: the output may be gs://
            fig.savefig(f, format="png")
    return [str(p) for p in written]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.ERROR)
    figures = cli.run_or_fail(PROGRAM, draw)
    print(json.dumps({"output": str(paths.resolve(FLAGS.output)), "figures": len(figures)}), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
