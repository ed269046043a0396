"""The ablation notebooks run top to bottom at smoke size (DSV3_NOTEBOOK_SIZE=smoke): a notebook
that errors fails here. Smoke runs write to a temporary DSV3_RESULTS_DIR, never over the committed
results in experiments/results/. All four together take ~2 minutes on 2 CPU cores."""
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["cost", "fp8_vs_bf16", "load_balancing", "mtp"]


# the MTP notebook (~55 s at smoke size, the longest) runs in the slow tier, so that the
# default tier stays under ~15 minutes on 2 cores; the other three run in the default tier
@pytest.mark.parametrize("name", [n if n != "mtp" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
def test_notebook_runs_at_smoke_size(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_NOTEBOOK_SIZE", "smoke")
    monkeypatch.setenv("DSV3_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:                      # executed from the sources, not stored outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    t0 = time.time()
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()                           # raises CellExecutionError on any error
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "size: smoke" in text
    assert (tmp_path / name / "results.json").exists()
    committed = NOTEBOOKS.parent / "experiments" / "results" / name / "results.json"
    if committed.exists():                     # the committed full results are untouched
        assert '"size": "full"' in committed.read_text()
    figures = (NOTEBOOKS.parent / "experiments" / "figures").glob(f"{name}*.png")
    assert not [p for p in figures if p.stat().st_mtime >= t0]     # smoke saves no figure
