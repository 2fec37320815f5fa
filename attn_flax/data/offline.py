"""`attn_flax_shapes`: the project's default dataset, generated locally with no download.

A TFDS `GeneratorBasedBuilder` over the cluttered scenes of `attn_flax.data.scenes`: ten shape
classes at random positions and scales among distractors, so that attending to the right place is
what the task is about. The examples are a pure function of the config's seed; importing this module
registers the builder, and `attn_flax.data` prepares it by itself on first use. Images are stored as
raw uint8 tensors (no PNG encode/decode). Configs: `default` (50,000 train / 10,000 test) and `tiny`
(500 / 100, a prefix of the same streams, for tests).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attn_flax.data import scenes

NAME = "attn_flax_shapes"
SEED = 20_240_601


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Sizes and seed of one variant of the dataset."""

    num_train: int = 50_000
    num_test: int = 10_000
    seed: int = SEED


class AttnFlaxShapes(tfds.core.GeneratorBasedBuilder):
    """Ten shape classes, one object per 32x32 cluttered scene; generated offline and deterministically."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="50,000 train / 10,000 test scenes."),
        ShapesConfig(name="tiny", description="500 train / 100 test scenes, for tests.", num_train=500, num_test=100),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(
                    shape=(scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3),
                    dtype=np.uint8,
                    encoding=tfds.features.Encoding.BYTES,
                ),
                "label": tfds.features.ClassLabel(names=list(scenes.CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test),
        }

    def _generate_examples(self, split: str, num_examples: int):
        seed = self.builder_config.seed
        for chunk, start in enumerate(range(0, num_examples, scenes.CHUNK_SIZE)):
            images, labels = scenes.render_chunk(seed, split, chunk)
            for offset in range(min(scenes.CHUNK_SIZE, num_examples - start)):
                yield start + offset, {"image": images[offset], "label": labels[offset]}
