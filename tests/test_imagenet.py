"""ImageNet as users prepare it: fabricated ILSVRC-2012 archives in the real layout, TFDS's own builder, train.py
and eval.py on the result (tiny model, 32-pixel crops), exact resume, and one-line errors for every state a
preparation can be in (see the session fixture `imagenet_dir` in conftest.py)."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import attn_flax.data as data
from attn_flax.data import catalog, prepare, testing
from conftest import IMAGENET_NUM_TRAIN, IMAGENET_NUM_VAL
from test_fault_tolerance import ENV, REPO, assert_same_params, params_at

pytestmark = pytest.mark.heavy

IMAGENET = "configs/imagenet.py:resnet18,cbam"
TINY_IMAGENET = {"widths": "(8,16,16,16)", "stage_sizes": "(1,1,1,1)", "image_size": 32, "batch_size": 16,
                 "eval_batch_size": 64, "bn_group_size": 8, "log_every_steps": 2, "checkpoint_every_steps": 2,
                 "eval_every_steps": 1000}


def run_script(script, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def train(workdir, data_dir, steps):
    fields = dict(TINY_IMAGENET, num_train_steps=steps, data_dir=data_dir)
    return run_script("train.py", f"--config={IMAGENET}", f"--workdir={workdir}",
                      *(f"--config.{k}={v}" for k, v in fields.items()))


def test_prepared_from_the_real_layout(imagenet_dir):
    """Split sizes and classes of the archives; the builder's CMYK and PNG files come out as RGB JPEGs, labelled
    by their synset; validation labels are tfds's list in file-name order."""
    info = data.dataset_info("imagenet2012", data_dir=imagenet_dir)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (IMAGENET_NUM_TRAIN,
                                                                                   IMAGENET_NUM_VAL, 1000)
    assert (info.recipe, info.image_size) == ("large", 224)
    builder = catalog.random_access_builder(catalog.load_builder("imagenet2012", imagenet_dir))
    train = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    records = {r["file_name"].decode(): r for r in train.__getitems__(range(len(train)))}
    cmyk, png = testing._special_names()
    for name in cmyk + png:
        image = Image.open(io.BytesIO(records[name]["image"]))
        assert (image.format, image.mode) == ("JPEG", "RGB"), name
        assert info.class_names[records[name]["label"]] == name.split("_")[0]
    validation = builder.as_data_source(split="validation")
    labels = {r["file_name"].decode(): r["label"] for r in validation.__getitems__(range(len(validation)))}
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
    expected = tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME).read_text().split()[:IMAGENET_NUM_VAL]
    assert [info.class_names[labels[f"ILSVRC2012_val_{i:08d}.JPEG"]] for i in range(1, 301)] == expected


def test_prepare_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    manual = tmp_path / "manual"
    assert prepare.main(["imagenet2012", f"--data_dir={tmp_path}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ILSVRC2012_img_train.tar is not in" in lines[0] and "downloads/manual" in lines[0]
    manual.mkdir()
    (manual / "ILSVRC2012_img_train.tar").write_bytes(b"\0" * 10)
    (manual / "ILSVRC2012_img_val.tar").write_bytes(b"\0" * 10)
    assert prepare.main(["imagenet2012", f"--data_dir={tmp_path}", f"--manual_dir={manual}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not a tar archive" in lines[0] and "download it again" in lines[0]
    assert prepare.main(["no_such_dataset", f"--data_dir={tmp_path}"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_a_tfrecord_copy_is_refused_in_one_line_then_converted_in_place(imagenet_dir, tmp_path):
    """What `tfds build` leaves by default (tfrecord) cannot be read by random access: dataset_info says what to
    run; `prepare` then adds array_record shards of the same records, and the batches equal those read from a
    dataset built as array_record directly."""
    manual = os.path.join(os.path.dirname(imagenet_dir), "manual")
    tfds.builder("imagenet2012", data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    with pytest.raises(data.DatasetNotPreparedError) as error:
        data.dataset_info("imagenet2012", data_dir=str(tmp_path))
    assert "stored as tfrecord" in str(error.value) and "\n" not in str(error.value)
    assert f"python -m attn_flax.data.prepare imagenet2012 --data_dir={tmp_path}" in str(error.value)
    assert "array_record added" in prepare.prepare("imagenet2012", data_dir=str(tmp_path))
    assert "already prepared" in prepare.prepare("imagenet2012", data_dir=str(tmp_path))
    ours = next(data.eval_batches("imagenet2012", global_batch_size=16, data_dir=str(tmp_path), image_size=32))
    reference = next(data.eval_batches("imagenet2012", global_batch_size=16, data_dir=imagenet_dir, image_size=32))
    for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(ours[key], reference[key])
    assert tfds.builder("imagenet2012", data_dir=str(tmp_path)).as_dataset(split="validation") is not None


def test_missing_split_or_shard_is_one_line(imagenet_dir, tmp_path):
    """A partial copy (a shard deleted), and a preparation made without the train archive (TFDS's builder then
    warns and writes the validation split only)."""
    copy = tmp_path / "copy"
    shutil.copytree(imagenet_dir, copy)
    version_dir = copy / "imagenet2012" / "5.1.0"
    next(version_dir.glob("imagenet2012-validation.array_record-*")).unlink()
    with pytest.raises(data.DatasetNotPreparedError, match=r"misses 1 of its 'validation' files .*copy them again"):
        data.dataset_info("imagenet2012", data_dir=str(copy))
    val_only = tmp_path / "val_only"
    (val_only / "manual").mkdir(parents=True)
    os.symlink(os.path.join(os.path.dirname(imagenet_dir), "manual", catalog.IMAGENET_ARCHIVES[1]),
               val_only / "manual" / catalog.IMAGENET_ARCHIVES[1])
    tfds.builder("imagenet2012", data_dir=str(val_only), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(val_only / "manual")))
    with pytest.raises(data.DatasetNotPreparedError) as error:
        data.dataset_info("imagenet2012", data_dir=str(val_only))
    assert "has no 'train' split" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("state", ["empty", "archives_only", "tfrecord"])
def test_train_py_refuses_an_unprepared_imagenet_in_one_line_before_compiling(imagenet_dir, tmp_path, state):
    data_dir = tmp_path / "tfds"
    if state == "archives_only":
        manual = data_dir / "downloads" / "manual"
        manual.mkdir(parents=True)
        for archive in catalog.IMAGENET_ARCHIVES:
            os.symlink(os.path.join(os.path.dirname(imagenet_dir), "manual", archive), manual / archive)
    if state == "tfrecord":
        tfds.builder("imagenet2012", data_dir=str(data_dir), file_format="tfrecord").download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.join(os.path.dirname(imagenet_dir), "manual")))
    proc = train(str(tmp_path / "run"), str(data_dir), 2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("W0", "I0", "WARNING"))]
    assert len(lines) == 1 and f"python -m attn_flax.data.prepare imagenet2012 --data_dir={data_dir}" in lines[0]
    assert ("the archives are in" in lines[0]) == (state == "archives_only")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_eval_and_exact_resume_on_imagenet(imagenet_dir, tmp_path):
    """train.py with configs/imagenet.py (tiny widths, 32-pixel crops): 4 steps straight equal 2 steps then a
    resumed 2, bit for bit; the loss is finite; eval.py scores each of the 300 validation images once."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for workdir, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
        proc = train(workdir, imagenet_dir, steps)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the checkpoint at step 2" in proc.stdout
    assert_same_params(params_at(straight, 4), params_at(resumed, 4))
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses and np.isfinite(losses).all()
    evals = [r for r in rows if "eval_examples" in r]
    assert evals and evals[-1]["eval_examples"] == IMAGENET_NUM_VAL
    proc = run_script("eval.py", f"--workdir={straight}", "--batch_size=48")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["eval_examples"] == IMAGENET_NUM_VAL and scores["dataset"] == "imagenet2012"
    assert np.isfinite(scores["eval_loss"])
    np.testing.assert_allclose(scores["eval_loss"], evals[-1]["eval_loss"], rtol=1e-4)
