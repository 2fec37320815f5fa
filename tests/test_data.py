"""Input pipelines: CIFAR and ImageNet under tfds.testing.mock_data, exactly-once eval, exact resume, errors."""
import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import attn_flax.data as data
from attn_flax.data import catalog, jpeg, order, pipeline, preprocess
from attn_flax.data.testing import mock_prepared

NUM_MOCK = 7


@pytest.fixture(scope="module")
def mock_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_mock"))


@pytest.fixture
def mocked(mock_root):
    with mock_prepared(mock_root, NUM_MOCK):
        yield


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_train_shapes_dtypes_and_random_augmentation(mocked, name, classes):
    info = data.dataset_info(name)
    assert (info.num_classes, info.image_size, info.eval_split, info.recipe) == (classes, 32, "test", "small")
    batches = _take(data.train_batches(name, global_batch_size=4, seed=0, with_index=True), 4)
    batch = batches[0]
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and ((batch["label"] >= 0) & (batch["label"] < classes)).all()
    low = (0 - np.array(info.mean)) / np.array(info.std)
    high = (1 - np.array(info.mean)) / np.array(info.std)
    assert (batch["image"] >= low - 1e-5).all() and (batch["image"] <= high + 1e-5).all()
    images = np.concatenate([b["image"] for b in batches])
    indices = np.concatenate([b["index"] for b in batches])
    first, second = (np.flatnonzero(indices == indices[0])[:2])
    assert first != second and not np.array_equal(images[first], images[second])


def test_cifar_eval_is_normalised_pixels(mocked):
    info = data.dataset_info("cifar10")
    raw = tfds.as_numpy(tfds.builder("cifar10").as_dataset(split="test", batch_size=-1))
    batches = list(data.eval_batches("cifar10", global_batch_size=8, with_index=True))
    assert len(batches) == 1
    expected = (raw["image"][batches[0]["index"]] / 255.0 - np.array(info.mean)) / np.array(info.std)
    np.testing.assert_allclose(batches[0]["image"], expected, atol=1e-5)
    assert batches[0]["mask"].tolist() == [True] * NUM_MOCK + [False]
    again = list(data.eval_batches("cifar10", global_batch_size=8))
    np.testing.assert_array_equal(again[0]["image"], batches[0]["image"])


def test_imagenet_train_decodes_random_crops(mocked):
    info = data.dataset_info("imagenet2012")
    assert (info.image_size, info.eval_split, info.recipe, info.num_classes) == (224, "validation", "large", 1000)
    stream = data.train_batches("imagenet2012", global_batch_size=4, seed=1, with_index=True)
    batches = _take(stream, 4)
    assert batches[0]["image"].shape == (4, 224, 224, 3) and batches[0]["image"].dtype == np.float32
    assert batches[0]["label"].dtype == np.int32
    low = (0 - np.array(catalog.IMAGENET_MEAN)) / np.array(catalog.IMAGENET_STD)
    high = (1 - np.array(catalog.IMAGENET_MEAN)) / np.array(catalog.IMAGENET_STD)
    overshoot = 1.0  # bicubic interpolation overshoots 0-255 near sharp edges (mock images are noise), as the reference
    assert (batches[0]["image"] >= low - overshoot).all() and (batches[0]["image"] <= high + overshoot).all()
    images = np.concatenate([b["image"] for b in batches])
    indices = np.concatenate([b["index"] for b in batches])
    first, second = np.flatnonzero(indices == indices[0])[:2]
    assert not np.allclose(images[first], images[second])


def test_imagenet_eval_is_deterministic_and_masked(mocked):
    runs = [list(data.eval_batches("imagenet2012", global_batch_size=4, dtype=np.float32)) for _ in range(2)]
    assert len(runs[0]) == 2
    for a, b in zip(*runs):
        assert a["image"].shape == (4, 224, 224, 3)
        np.testing.assert_array_equal(a["image"], b["image"])
    assert sum(int(b["mask"].sum()) for b in runs[0]) == NUM_MOCK


def _jpeg(pixels: np.ndarray, mode: str = "RGB", file_format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=file_format, quality=95)
    return buffer.getvalue()


def _photo(height: int, width: int) -> np.ndarray:
    """A smooth, photo-like RGB image (bilinear upsampling of random colours)."""
    coarse = np.random.default_rng(height * width).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def test_eval_view_is_the_window_resize_256_then_central_224_keeps():
    """The window is the reference's (Flax example, crop_padding 32); the view is close to the official recipe as
    torchvision computes it on PIL images, Resize(256) then CenterCrop(224) (bilinear, antialiased)."""
    assert jpeg.center_crop_window(tf.constant([375, 500])).numpy().tolist() == [24, 86, 328, 328]
    assert jpeg.center_crop_window(tf.constant([500, 375])).numpy().tolist() == [86, 24, 328, 328]
    pixels = _photo(375, 500)
    resized = Image.fromarray(pixels).resize((round(500 * 256 / 375), 256), Image.BILINEAR)
    left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
    reference = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32)
    ours = jpeg.decode_center_crop(tf.constant(_jpeg(pixels)), 224).numpy()
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert np.abs(ours - reference).mean() < 3.0  # JPEG loss, bicubic vs antialiased bilinear, rounding


def test_random_crop_windows_cover_8_to_100_percent_at_3_4_to_4_3():
    windows = np.array([jpeg.random_crop_window(tf.constant([375, 500]), tf.constant([3, p], tf.int64)).numpy()
                        for p in range(300)])
    top, left, height, width = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 375).all() and (left + width <= 500).all()
    area = height * width / (375 * 500)
    fitted = area < 1.0  # the rest fell back to the whole image
    assert fitted.mean() > 0.8 and area.min() >= 0.075
    assert (width / height)[fitted].min() >= 0.74 and (width / height)[fitted].max() <= 1.34
    assert 0.35 < area.mean() < 0.7 and len({tuple(w) for w in windows}) > 290
    again = jpeg.random_crop_window(tf.constant([375, 500]), tf.constant([3, 17], tf.int64)).numpy()
    np.testing.assert_array_equal(again, windows[17])


def test_train_view_is_a_pure_function_of_seed_and_position():
    encoded = tf.constant(_jpeg(_photo(375, 500)))
    views = [jpeg.decode_random_crop(encoded, tf.constant([7, p], tf.int64), 64).numpy() for p in (0, 0, 1)]
    assert views[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(views[0], views[1])
    assert not np.array_equal(views[0], views[2])


@pytest.mark.parametrize("mode,file_format", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")])
def test_cmyk_grey_and_png_decode_to_rgb(mode, file_format):
    pixels = _photo(40, 48)
    encoded = tf.constant(_jpeg(pixels, mode, file_format))
    view = jpeg.decode_center_crop(encoded, 32, is_jpeg=file_format == "JPEG").numpy()
    assert view.shape == (32, 32, 3)
    source = np.asarray(Image.fromarray(pixels).convert("L").convert("RGB")) if mode == "L" else pixels
    window = jpeg.center_crop_window(tf.constant([40, 48]), 32).numpy()
    reference = tf.image.resize(source[window[0]:window[0] + window[2], window[1]:window[1] + window[3]],
                                [32, 32], method="bicubic").numpy()
    assert np.abs(view - reference).mean() < 8.0


def test_pad_crop_flip_offsets_are_padded_windows():
    images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    positions = np.arange(2)
    out = preprocess.pad_crop_flip(images, 3, positions, pad=1)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(2):
        top = preprocess.random_ints(3, positions, 0, 3)[i]
        left = preprocess.random_ints(3, positions, 1, 3)[i]
        window = padded[i, top:top + 4, left:left + 4]
        flipped = preprocess.random_ints(3, positions, 2, 2)[i]
        np.testing.assert_array_equal(out[i], window[:, ::-1] if flipped else window)


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_eval_sees_every_example_exactly_once(mocked, name):
    single = list(data.eval_batches(name, global_batch_size=4, with_index=True))
    shares = [list(data.eval_batches(name, global_batch_size=4, process_index=p, process_count=2, with_index=True))
              for p in range(2)]
    assert len(single) == len(shares[0]) == len(shares[1]) == data.num_eval_batches(name, global_batch_size=4) == 2
    for batches, local in [(single, 4), (shares[0], 2), (shares[1], 2)]:
        assert all(b["image"].shape[0] == local for b in batches)
    seen = [i for batches in [shares[0], shares[1]] for b in batches for i in b["index"][b["mask"]]]
    assert sorted(seen) == list(range(NUM_MOCK))
    seen_single = [i for b in single for i in b["index"][b["mask"]]]
    assert sorted(seen_single) == list(range(NUM_MOCK))
    for b, (p0, p1) in zip(single, zip(*shares)):
        np.testing.assert_array_equal(b["image"], np.concatenate([p0["image"], p1["image"]]))


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_resumed_stream_equals_uninterrupted(mocked, name):
    full = _take(data.train_batches(name, global_batch_size=4, seed=5), 5)
    resumed = _take(data.train_batches(name, global_batch_size=4, seed=5, start_step=3), 2)
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_process_shares_form_the_global_batch(mocked):
    whole = _take(data.train_batches("cifar10", global_batch_size=4, seed=2, with_index=True), 3)
    shares = [_take(data.train_batches("cifar10", global_batch_size=4, seed=2, process_index=p, process_count=2,
                                       with_index=True), 3) for p in range(2)]
    for b, p0, p1 in zip(whole, *shares):
        np.testing.assert_array_equal(b["index"], np.concatenate([p0["index"], p1["index"]]))
        np.testing.assert_array_equal(b["image"], np.concatenate([p0["image"], p1["image"]]))


def test_epochs_are_permutations_and_reshuffled():
    stream = order.TrainOrder(seed=0, num_examples=7)
    positions = np.arange(21)
    indices = stream.indices(positions)
    for epoch in range(3):
        assert sorted(indices[7 * epoch:7 * (epoch + 1)]) == list(range(7))
    assert not np.array_equal(indices[:7], indices[7:14])
    np.testing.assert_array_equal(order.TrainOrder(0, 7).indices(positions[10:]), indices[10:])


def test_bad_input_gives_one_line_errors(mocked, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_set'.*any TFDS image-classification"):
        data.dataset_info("no_such_set")
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        next(data.train_batches("cifar10", global_batch_size=4, seed=0, process_count=3))
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        data.eval_batches("cifar10", global_batch_size=4, process_count=3)


def test_unprepared_dataset_says_what_to_do(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as error:
        data.dataset_info("cifar10", data_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert f"python -m attn_flax.data.prepare cifar10 --data_dir={tmp_path}" in message
    with pytest.raises(data.DatasetNotPreparedError, match="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.*"
                       "downloads/manual, then run `python -m attn_flax.data.prepare imagenet2012"):
        data.dataset_info("imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not an image-classification dataset"):
        data.dataset_info("glue/cola", data_dir=str(tmp_path))


# --- The Grain streams on a real prepared ImageNet (fabricated archives, TFDS's builder; conftest.imagenet_dir) ---

def _imagenet_train(imagenet_dir, **kwargs):
    return data.train_batches("imagenet2012", data_dir=imagenet_dir, image_size=32, global_batch_size=6, seed=11,
                              **kwargs)


def test_imagenet_resumed_streams_equal_uninterrupted(imagenet_dir):
    """From start_step and from Grain's saved iterator state: the same batches as the uninterrupted stream."""
    full = _take(_imagenet_train(imagenet_dir, with_index=True), 5)
    from_step = _take(_imagenet_train(imagenet_dir, with_index=True, start_step=3), 2)
    stream = _imagenet_train(imagenet_dir, with_index=True)
    _take(stream, 3)
    state = stream.get_state()
    restored = _imagenet_train(imagenet_dir, with_index=True)
    restored.set_state(state)
    for resumed in (from_step, _take(restored, 2)):
        for a, b in zip(full[3:], resumed):
            for key in ("image", "label", "index"):
                np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(full[3]["index"], full[4]["index"])


def test_small_dataset_grain_state_resumes_exactly(mocked):
    stream = data.train_batches("cifar10", global_batch_size=4, seed=5)
    _take(stream, 2)
    state = stream.get_state()
    expected = _take(stream, 2)
    restored = data.train_batches("cifar10", global_batch_size=4, seed=5)
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 2)):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_imagenet_process_shares_form_the_global_batch(imagenet_dir):
    whole = _take(_imagenet_train(imagenet_dir, with_index=True), 2)
    shares = [_take(_imagenet_train(imagenet_dir, with_index=True, process_index=p, process_count=3), 2)
              for p in range(3)]
    for b, *parts in zip(whole, *shares):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(b[key], np.concatenate([p[key] for p in parts]))


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_imagenet_eval_covers_each_example_once(imagenet_dir, process_count):
    """300 validation images in global batches of 42 (8 batches, the last padded): each image exactly once over
    the processes, every process the same number of batches, the shares concatenating to the 1-process batch."""
    def batches(p, count):
        return list(data.eval_batches("imagenet2012", global_batch_size=42, data_dir=imagenet_dir, image_size=32,
                                      process_index=p, process_count=count, with_index=True))

    shares = [batches(p, process_count) for p in range(process_count)]
    assert {len(s) for s in shares} == {8}
    seen = [i for share in shares for b in share for i in b["index"][b["mask"]]]
    assert sorted(seen) == list(range(300))
    labels = catalog.random_access_builder(catalog.load_builder("imagenet2012", imagenet_dir)).as_data_source(
        split="validation", decoders={"image": tfds.decode.SkipDecoding()})
    for share in shares:
        for b in share:
            assert b["image"].shape == (42 // process_count, 32, 32, 3)
            assert b["label"].tolist() == [labels[int(i)]["label"] for i in b["index"]]
    if process_count > 1:
        single = batches(0, 1)
        for b, parts in zip(single, zip(*shares)):
            np.testing.assert_array_equal(b["image"], np.concatenate([p["image"] for p in parts]))


def test_imagenet_batches_do_not_depend_on_the_number_of_reader_threads(imagenet_dir, monkeypatch):
    default = _take(_imagenet_train(imagenet_dir, start_step=2), 3)
    monkeypatch.setattr(pipeline, "RECORD_READ_THREADS", 1)
    single = _take(_imagenet_train(imagenet_dir, start_step=2), 3)
    for a, b in zip(default, single):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_imagenet_views_are_the_decoders_output_normalised(imagenet_dir):
    """A training example is `jpeg.decode_random_crop` of its record seeded by (seed, stream position), normalised."""
    batch = next(_imagenet_train(imagenet_dir, with_index=True, start_step=1))
    source = catalog.random_access_builder(catalog.load_builder("imagenet2012", imagenet_dir)).as_data_source(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    for slot in (0, 5):
        record = source[int(batch["index"][slot])]
        pixels = jpeg.decode_random_crop(tf.constant(record["image"]), tf.constant([11, 6 + slot], tf.int64), 32)
        expected = jpeg.normalise(pixels, catalog.IMAGENET_MEAN, catalog.IMAGENET_STD).numpy()
        np.testing.assert_allclose(batch["image"][slot], expected, atol=1e-6)
        assert batch["label"][slot] == record["label"]


def test_normalise_equals_broadcast_float_arithmetic():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    mean, std = catalog.IMAGENET_MEAN, catalog.IMAGENET_STD
    expected = (pixels.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(preprocess.normalise(pixels, mean, std), expected, atol=1e-6)
    scale, offset = preprocess._scale_offset(mean, std)
    np.testing.assert_array_equal(preprocess.normalise(pixels, mean, std), pixels.astype(np.float32) * scale - offset)
    np.testing.assert_allclose(preprocess.normalise(pixels[:, ::-1], mean, std), expected[:, ::-1], atol=1e-6)
    import ml_dtypes
    half = preprocess.normalise(pixels, mean, std, ml_dtypes.bfloat16)
    assert half.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(half, preprocess.normalise(pixels, mean, std).astype(ml_dtypes.bfloat16))
