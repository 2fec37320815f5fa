"""notebooks/quickstart.ipynb runs top to bottom (tiny settings), and matches its generator."""
import nbclient
import pytest
import nbformat

import tiny_runs

NOTEBOOK = tiny_runs.REPO / "notebooks" / "quickstart.ipynb"


def test_the_committed_notebook_is_what_the_generator_writes_without_outputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_quickstart", NOTEBOOK.parent / "build_quickstart.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in builder.build().cells]
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in committed.cells if c.cell_type == "code")


@pytest.mark.heavy
def test_the_quickstart_notebook_executes_top_to_bottom(tmp_path_factory, tmp_path, monkeypatch):
    data_dir = tiny_runs.data_dir(tmp_path_factory.getbasetemp() / "tools")
    for key, value in {**tiny_runs.subprocess_env(), "ATTN_FLAX_NOTEBOOK_TINY": "1",
                       "ATTN_FLAX_NOTEBOOK_DATA_DIR": data_dir}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {c.id: c.outputs for c in notebook.cells if c.cell_type == "code"}
    text = "".join(o.get("text", "") for cell in outputs.values() for o in cell)
    assert "attn_flax_shapes/tiny: 500 train / 100 eval" in text
    assert "step 3: loss" in text
    scores = [o for cell in outputs.values() for o in cell if o.output_type == "execute_result"
              and "eval_accuracy" in o.data.get("text/plain", "")]
    assert len(scores) == 1 and "'eval_examples': 100" in scores[0].data["text/plain"]
    images = [o for cell in outputs.values() for o in cell if "image/png" in o.get("data", {})]
    assert len(images) == 2
