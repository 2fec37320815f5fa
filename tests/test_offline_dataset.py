"""The offline dataset attn_flax_shapes: deterministic, all classes present, train and test disjoint."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

import attn_flax.data as data
from attn_flax.data import offline, scenes

TINY = "attn_flax_shapes/tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    data.dataset_info(TINY, data_dir=root)
    return root


def _split(root, split):
    return tfds.as_numpy(tfds.builder(TINY, data_dir=root).as_dataset(split=split, batch_size=-1))


def test_same_seed_gives_same_scenes():
    a_images, a_labels = scenes.render_chunk(7, "train", 3, count=64)
    b_images, b_labels = scenes.render_chunk(7, "train", 3, count=64)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    c_images, _ = scenes.render_chunk(8, "train", 3, count=64)
    assert not np.array_equal(a_images, c_images)


def test_prepared_on_first_use_and_equal_to_the_generator(tiny_dir):
    info = data.dataset_info(TINY, data_dir=tiny_dir)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes, info.image_size) == (500, 100, 10, 32)
    stored = _split(tiny_dir, "train")
    seed = offline.SEED
    images, labels = scenes.render_split(seed, "train", 500)
    order = np.lexsort(images.reshape(500, -1).T)
    stored_order = np.lexsort(stored["image"].reshape(500, -1).T)
    np.testing.assert_array_equal(stored["image"][stored_order], images[order])
    np.testing.assert_array_equal(stored["label"][stored_order], labels[order])


def test_tiny_is_a_prefix_of_the_full_config():
    seed = offline.SEED
    prefix, _ = scenes.render_split(seed, "test", 100)
    first_chunk, _ = scenes.render_chunk(seed, "test", 0)
    np.testing.assert_array_equal(prefix, first_chunk[:100])


def test_all_classes_present_and_splits_disjoint(tiny_dir):
    train, test = _split(tiny_dir, "train"), _split(tiny_dir, "test")
    assert set(train["label"].tolist()) == set(range(10)) == set(test["label"].tolist())
    train_keys = {image.tobytes() for image in train["image"]}
    assert not any(image.tobytes() in train_keys for image in test["image"])
    assert len(train_keys) == len(train["image"])


def test_offline_pipelines(tiny_dir):
    batch = next(data.train_batches(TINY, global_batch_size=8, seed=0, data_dir=tiny_dir))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32
    eval_batches = data.eval_batches(TINY, global_batch_size=64, data_dir=tiny_dir)
    assert len(eval_batches) == 2
    assert sum(int(b["mask"].sum()) for b in eval_batches) == 100


def test_classes_are_flip_invariant():
    size = 64
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    u, v = grid[None, None, :], grid[None, :, None]
    for k in range(len(scenes.CLASS_NAMES)):
        mask = scenes._shape_mask(np.array([k]), u, v)[0]
        np.testing.assert_array_equal(mask, mask[:, ::-1], err_msg=scenes.CLASS_NAMES[k])
