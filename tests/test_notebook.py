"""The Colab quickstart notebook, executed end to end at the tiny size on the CPU, as CI runs it."""

import json
import math
import os
import pathlib
import re
import sys

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart_colab.ipynb"


def set_parameters(nb, **values) -> None:
  """Rewrites `NAME = ...` lines of the cell tagged `parameters`; every NAME must be assigned there."""
  (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  for name, value in values.items():
    cell.source, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", cell.source, flags=re.M)
    assert count == 1, f"the parameters cell assigns {name} {count} times"


def outputs(nb, output_type=None):
  return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
          if output_type is None or out.output_type == output_type]


def test_committed_notebook_is_valid_and_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert not outputs(nb) and all(c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_quickstart_notebook_runs_tiny_on_cpu(tmp_path, monkeypatch):
  # The kernel must be this environment's Python: jupyter_client maps a spec starting with plain `python`
  # to sys.executable, which is what ipykernel registers for `python3`.
  argv = KernelSpecManager().get_kernel_spec("python3").argv
  assert argv[0] in ("python", "python3", sys.executable), \
      f"the python3 kernel runs {argv[0]}, not {sys.executable}"

  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "quickstart"
  set_parameters(nb, TINY=True, WORKDIR=str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # inherited by the kernel and by main.py under it
  monkeypatch.delenv("MPLBACKEND", raising=False)
  # Raises CellExecutionError, naming the cell, when any cell fails (main.py's non-zero exit included).
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO_ROOT)}}).execute()

  text = "".join(out.get("text", "") for out in outputs(nb, "stream"))
  assert f"at {sys.executable}" in text  # the kernel ran this environment's Python
  assert "nothing to install" in text  # the checkout path: no clone, no pip
  assert "platform=cpu" in text  # the device report

  summary = json.loads((workdir / "summary.json").read_text())
  test_metrics = summary["final"]["test"]
  assert summary["synthetic_data"] and summary["main_metric"] in test_metrics
  assert test_metrics and all(math.isfinite(value) for value in test_metrics.values())

  rich = [out["data"] for out in outputs(nb) if out.output_type in ("display_data", "execute_result")]
  assert sum("image/png" in data for data in rich) >= 2  # curves (and example maps) shown inline
  tables = [data["text/markdown"] for data in rich if "text/markdown" in data]
  assert len(tables) == 1 and "| metric | validation | test |" in tables[0]
  assert f"| **{summary['main_metric']}** |" in tables[0]
  main_value = f"{test_metrics[summary['main_metric']]:.4f}"
  assert any(line.startswith(f"| **{summary['main_metric']}**") and line.endswith(f"| {main_value} |")
             for line in tables[0].splitlines())
  assert "tensorboard --logdir" in text and os.path.isdir(workdir / "tensorboard")
  assert "Skipped: RUN_REAL_BEN_GE is False." in text
