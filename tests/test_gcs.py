"""Everything on ``gs://`` as on local disk, against a GCS server on 127.0.0.1 (the ``gcs`` fixture, conftest.py).

One tiny run with ``--workdir=gs://BUCKET/run`` and its data prepared in ``gs://BUCKET/tfds`` goes through what
a cluster does to it: killed with SIGKILL after its first checkpoint, restarted, preempted with SIGTERM, its
newest checkpoint damaged, restarted to the end; it must end with the parameters of an uninterrupted run on
local disk, bit for bit. eval.py, visualize.py and the converter then read and write that bucket. The commands run
as subprocesses through the emulator's ``run.sh`` (TensorFlow's GCS client needs its private ``/etc/hosts``);
the test process checks the bucket over the server's JSON API. No local folder named ``gs:`` may appear.
"""
import json
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_runs
from attn_flax.training import checkpoints, loop
from test_fault_tolerance import finish

pytestmark = [pytest.mark.heavy, pytest.mark.xdist_group("gcs")]  # one emulator per machine (port 443): its tests run in one worker

REPO = tiny_runs.REPO
ENV = {**tiny_runs.subprocess_env(), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
       "TF_CPP_MIN_LOG_LEVEL": "2"}
RUN = dict(tiny_runs.TINY_FIELDS, num_train_steps=24, log_every_steps=4, checkpoint_every_steps=4,
           keep_checkpoints=2)
"""The gs:// run: a cosine schedule over 24 steps (a resumed run must plan the same length), a checkpoint every
4 steps of which the newest 2 are kept, so Orbax deletes older steps on gs:// as it goes."""


def flag(value) -> str:
    return "(" + ",".join(map(str, value)) + ")" if isinstance(value, tuple) else str(value)


def start(gcs, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(gcs.command([sys.executable, *args]), env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(gcs, args: list[str], timeout: float = 300) -> tuple[int, str, str]:
    return finish(start(gcs, args), timeout)


def train(gcs, workdir: str, data_dir: str) -> subprocess.Popen:
    return start(gcs, [str(REPO / "train.py"), f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                       *(f"--config.{k}={flag(v)}" for k, v in RUN.items())])


def committed(gcs, prefix: str = "run/checkpoints/") -> list[int]:
    """Steps whose save committed (Orbax writes ``<step>/commit_success.txt`` last on GCS)."""
    return sorted(int(n[len(prefix):].split("/")[0]) for n in gcs.names(prefix)
                  if re.fullmatch(rf"{re.escape(prefix)}\d+/commit_success\.txt", n))


def wait_for_checkpoint(gcs, proc: subprocess.Popen, after: int = 0, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not [s for s in committed(gcs) if s > after]:
        assert proc.poll() is None, f"the run ended early: {finish(proc)}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def params(directory: pathlib.Path):
    return ocp.StandardCheckpointer().restore(directory / "state")["params"]


def stray_gs_folders() -> list[str]:
    """Local folders named ``gs:`` where a path mistaken for a local one would create them."""
    places = [REPO, pathlib.Path.cwd(), pathlib.Path(tempfile.gettempdir())]
    return [str(p / "gs:") for p in places if (p / "gs:").exists()]


@pytest.fixture(scope="module")
def story(gcs, tmp_path_factory, data_dir):
    """Prepares the data on gs://, then runs the gs:// run through kill -9, SIGTERM and a damaged checkpoint to
    its end; returns what each stage showed, for the tests below to check."""
    facts = {"stray_before": stray_gs_folders()}
    code, out, err = run(gcs, ["-m", "attn_flax.data.prepare", tiny_runs.TINY_DATASET, f"--data_dir={gcs.url('tfds')}"])
    assert code == 0, err[-3000:]
    facts["prepare"] = out
    workdir, gs_data = gcs.url("run"), gcs.url("tfds")

    proc = train(gcs, workdir, gs_data)  # 1. killed outright after its first checkpoint, maybe mid-save
    wait_for_checkpoint(gcs, proc)
    time.sleep(random.Random().uniform(0.0, 1.0))
    assert proc.poll() is None, "the run finished before the kill; lengthen RUN"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    facts["killed_at"] = committed(gcs)[-1]

    proc = train(gcs, workdir, gs_data)  # 2. restarted, then preempted after its next checkpoint
    wait_for_checkpoint(gcs, proc, after=facts["killed_at"])
    assert proc.poll() is None, "the run finished before SIGTERM; lengthen RUN"
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    facts["sigterm"] = finish(proc, timeout=120)
    facts["sigterm_seconds"] = time.monotonic() - sent
    facts["after_sigterm"] = committed(gcs)

    damaged = facts["after_sigterm"][-1]  # 3. the newest checkpoint damaged, then the run to its end
    gcs.write(f"run/checkpoints/{damaged}/state/_METADATA", b"garbage")
    facts["damaged"] = damaged
    facts["final"] = finish(train(gcs, workdir, gs_data))
    facts["steps"] = committed(gcs)
    facts["gs_params"] = params(gcs.download(f"run/checkpoints/{RUN['num_train_steps']}/",
                                             tmp_path_factory.mktemp("downloaded")))

    local = tmp_path_factory.mktemp("local_run")  # the same config on local disk, never interrupted
    loop.train_and_evaluate(tiny_runs.config(data_dir, **RUN), str(local))
    facts["local_params"] = params(local / "checkpoints" / str(RUN["num_train_steps"]))
    return facts


def test_a_gcs_run_killed_preempted_and_damaged_ends_as_an_uninterrupted_local_run(story):
    code, out, err = story["final"]
    assert code == 0, err[-3000:]
    resumed = int(re.search(r"resuming from the checkpoint at step (\d+) in gs://", out).group(1))
    assert resumed < story["damaged"], "the damaged checkpoint was not used"
    code, out, _ = story["sigterm"]
    assert f"resuming from the checkpoint at step {story['killed_at']} in gs://" in out
    leaves, reference = jax.tree.leaves(story["gs_params"]), jax.tree.leaves(story["local_params"])
    assert len(leaves) == len(reference)
    for a, b in zip(leaves, reference):
        np.testing.assert_array_equal(a, b)


def test_sigterm_on_gcs_saves_at_the_current_step_and_exits_0(story):
    code, out, err = story["sigterm"]
    print(f"SIGTERM to exit on gs://: {story['sigterm_seconds']:.1f} s")
    assert code == 0, err[-3000:]
    saved = int(re.search(r"preempted: saved a checkpoint at step (\d+) in gs://", out).group(1))
    assert saved == story["after_sigterm"][-1] > story["killed_at"]
    assert story["sigterm_seconds"] < 30, "a typical grace period is 30 s"


def test_a_damaged_gcs_checkpoint_is_moved_aside_and_saved_again(story, gcs):
    _, _, err = story["final"]
    step = story["damaged"]
    assert f"checkpoint {step} in gs://{gcs.bucket}/run/checkpoints cannot be restored" in err
    aside = {n.split("/")[2] for n in gcs.names(f"run/{checkpoints.DAMAGED}/") if n.count("/") > 2}
    assert [d.split("-")[0] for d in aside] == [str(step)], aside
    assert gcs.read(f"run/{checkpoints.DAMAGED}/{aside.pop()}/state/_METADATA") == b"garbage", "kept as it was"


def test_keep_checkpoints_deletes_old_steps_on_gcs_and_no_uncommitted_save_is_left(story, gcs):
    total = RUN["num_train_steps"]
    assert story["steps"] == [total - 4, total]
    folders = {n.split("/")[2] for n in gcs.names("run/checkpoints/") if n.count("/") > 2}
    assert folders == {str(total - 4), str(total)}, folders


def test_config_metrics_and_tensorboard_are_written_to_the_bucket(story, gcs):
    config = json.loads(gcs.read("run/config.json"))
    assert config["data_dir"] == gcs.url("tfds") and config["num_train_steps"] == RUN["num_train_steps"]
    rows = [json.loads(line) for line in gcs.read("run/metrics.jsonl").decode().splitlines()]
    assert rows[-1]["step"] == RUN["num_train_steps"] and rows[-1]["eval_examples"] == 100
    assert [r["step"] for r in rows if "train_loss" in r][:1] == [4], "the killed run's metrics are kept"
    assert [n for n in gcs.names("run/tensorboard/") if "events.out.tfevents" in n]


def test_the_dataset_is_prepared_in_and_read_from_the_bucket(story, gcs):
    assert f"prepared in gs://{gcs.bucket}/tfds/attn_flax_shapes/tiny/1.0.0" in story["prepare"]
    names = gcs.names("tfds/attn_flax_shapes/tiny/1.0.0/")
    assert any("train.tfrecord" in n for n in names) and any(n.endswith("dataset_info.json") for n in names)


def test_eval_reads_the_gcs_workdir_and_writes_eval_json_there(story, gcs):
    code, out, err = run(gcs, [str(REPO / "eval.py"), f"--workdir={gcs.url('run')}"])
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == RUN["num_train_steps"] and result["eval_examples"] == 100
    assert result["source"] == gcs.url("run")
    assert json.loads(gcs.read("run/eval.json")) == result
    rows = [json.loads(line) for line in gcs.read("run/metrics.jsonl").decode().splitlines()]
    assert result["eval_accuracy"] == rows[-1]["eval_accuracy"], "the run's own numbers"


def test_visualize_reads_the_gcs_workdir_and_writes_figures_there(story, gcs):
    code, out, err = run(gcs, [str(REPO / "visualize.py"), f"--workdir={gcs.url('run')}",
                               f"--output={gcs.url('figures')}", "--num_images=2", "--panel_size=48"])
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"output": gcs.url("figures"), "figures": 2}
    assert [n for n in gcs.names("figures/") if not n.endswith("/")] == ["figures/attention_000.png",
                                                                         "figures/attention_001.png"]
    assert gcs.read("figures/attention_001.png").startswith(b"\x89PNG")


CONVERT_ROUND_TRIP = """
import sys
import numpy as np
from attn_flax import convert
sys.path.insert(0, "tests")
from test_convert import random_official_state_dict
state = random_official_state_dict(18, "cbam", "cifar")
model, variables = convert.from_official(state, depth=18, attention="cbam", stem="cifar")
convert.save_converted(sys.argv[1], convert.model_spec(model, 18, "cbam", "cifar"), variables)
_, loaded = convert.load_converted(sys.argv[1])
kernel = loaded["params"]["stem_conv"]["kernel"]
np.testing.assert_array_equal(kernel, np.transpose(state["conv1.weight"], (2, 3, 1, 0)))
print("round trip ok")
"""


def test_a_converted_checkpoint_is_written_to_and_read_from_the_bucket(gcs):
    code, out, err = run(gcs, ["-c", CONVERT_ROUND_TRIP, gcs.url("converted_api")])
    assert code == 0 and "round trip ok" in out, err[-3000:]
    names = gcs.names("converted_api/")
    assert "converted_api/model.json" in names and any(n.startswith("converted_api/variables/") for n in names)


def test_the_converter_command_reads_and_writes_the_bucket(gcs, tmp_path):
    torch = pytest.importorskip("torch")  # reading a .pth.tar needs torch, as for every converter test
    from test_convert import random_official_state_dict

    state = random_official_state_dict(18, "cbam", "cifar")
    local = tmp_path / "official.pth.tar"
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}}, local)
    gcs.write("official/RESNET18_CIFAR_CBAM.pth.tar", local.read_bytes())
    args = ["-m", "attn_flax.convert", f"--checkpoint={gcs.url('official/RESNET18_CIFAR_CBAM.pth.tar')}",
            "--depth=18", "--attention=cbam", "--stem=cifar", f"--output={gcs.url('converted')}"]
    code, out, err = run(gcs, args)
    assert code == 0, err[-3000:]
    assert out.startswith(f"wrote {gcs.url('converted')}:")
    spec = json.loads(gcs.read("converted/model.json"))
    assert spec["source"] == "RESNET18_CIFAR_CBAM.pth.tar" and spec["model"] == "resnet18"
    assert any(n.startswith("converted/variables/") for n in gcs.names("converted/"))


def test_no_local_folder_named_gs_appears(story, tmp_path_factory):
    assert not story["stray_before"], "a gs: folder was there before the tests ran; remove it"
    assert not stray_gs_folders()
    assert not list(tmp_path_factory.getbasetemp().rglob("gs:"))
