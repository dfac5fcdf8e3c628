"""Every notebooks/*.ipynb runs top to bottom with MMJAX_NOTEBOOK_SMOKE=1, in a temp directory."""

import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "flash_attention.ipynb",
                                         "open_clip_import.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]'")
  nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]'")
  pytest.importorskip("ipykernel", reason="pip install -e '.[test]'")
  nb = nbformat.read(path, as_version=4)
  source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  if "import open_clip" in source and importlib.util.find_spec("open_clip") is None:
    pytest.skip(f"{path.name} needs open-clip-torch and torch: pip install -e '.[test]'")
  stale = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
  assert not stale, f"{path.name}: clear the outputs of cells {stale} before committing"

  # The kernel is a separate process: it gets the smoke switch, a private data dir and
  # this checkout first on its path, and runs in tmp_path so nothing lands in the repo.
  monkeypatch.setenv("MMJAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("MMJAX_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("TMPDIR", str(tmp_path))   # the notebooks' tempfile workdirs
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()   # raises CellExecutionError with the failing cell and its traceback
  images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "image/png" in o.get("data", {}))
  assert images >= 1, f"{path.name} drew no plot"
