"""Notebook conventions (static, fast) and mmlib.tools.run_notebooks.

The notebooks themselves are re-executed and compared by nbval:

    pytest --nbval notebooks/ --nbval-sanitize-with notebooks/nbval_sanitize.cfg
"""

import base64
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from mmlib.tools.run_notebooks import extract_figures, run_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))
EXPECTED = ["01_load_model", "02_forward_pass", "03_mrl_loss", "04_gradient_flow",
            "05_accuracy_vs_dimension"]
# A 1x1 transparent PNG.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


def test_the_tour_is_complete():
    assert [p.stem for p in NOTEBOOKS][: len(EXPECTED)] == EXPECTED


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def nb(request):
    return nbformat.read(request.param, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _texts(cell):
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            yield out.text
        elif out.output_type in ("execute_result", "display_data"):
            for key, value in out.get("data", {}).items():
                if key.startswith("text/"):
                    yield value if isinstance(value, str) else "".join(value)
        elif out.output_type == "error":
            yield f"{out.ename}: {out.evalue}"


def test_kernel_and_parameters_cell(nb):
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first = _code(nb)[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert 'MODEL = os.environ.get("MMLIB_MODEL", "tiny")' in first.source


def test_committed_executed_without_errors(nb):
    code = _code(nb)
    assert all(c.execution_count is not None for c in code), "execute the notebook before committing"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "run top to bottom in a fresh kernel"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


def test_outputs_are_clean(nb):
    for cell in _code(nb):
        text = "\n".join(_texts(cell))
        assert not re.search(r"<[\w.]+ object at 0x[0-9a-f]+>|Generator object at", text), cell.source[:80]
        assert "it/s]" not in text and "%|" not in text, f"progress bar in output: {cell.source[:80]}"
        assert not re.search(r"(/home/|/work/|/Users/|/root/|/tmp/)", text), f"machine path: {cell.source[:80]}"
        stderr = [o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, f"stderr output (warnings?) in: {cell.source[:80]}\n{stderr}"


def test_plots_and_timings_are_ignored_by_nbval(nb):
    for cell in _code(nb):
        has_image = any("image/png" in o.get("data", {}) for o in cell.outputs)
        timed = "perf_counter" in cell.source
        if has_image or timed:
            assert cell.source.startswith("# NBVAL_IGNORE_OUTPUT"), cell.source[:80]


def test_no_widget_state(nb):
    assert "widgets" not in nb.metadata
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                   for c in _code(nb) for o in c.outputs)


def test_extract_figures_names_by_tag(tmp_path):
    png = new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})
    nb = new_notebook(cells=[
        new_code_cell("plot()", outputs=[png], metadata={"tags": ["figure:loss curve"]}),
        new_code_cell("plot(); plot()", outputs=[png, png]),
        new_code_cell("print(1)", outputs=[new_output("stream", name="stdout", text="1\n")]),
    ])
    paths = extract_figures(nb, "07_demo", tmp_path)
    assert [p.name for p in paths] == ["07_demo-loss-curve.png", "07_demo-2.png", "07_demo-3.png"]
    assert paths[0].read_bytes() == base64.b64decode(PNG)


def test_run_notebook_executes_and_collects(tmp_path):
    nb = new_notebook(cells=[
        new_code_cell("import matplotlib.pyplot as plt\nfrom pathlib import Path\n"
                      "print(Path.cwd().name)"),
        new_code_cell("fig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()",
                      metadata={"tags": ["figure:line"]}),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "nbs" / "01_x.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    run = run_notebook(src, tmp_path / "out", timeout=120)
    assert run.error is None
    executed = nbformat.read(run.executed, as_version=4)
    assert executed.cells[0].outputs[0].text.strip() == "nbs"  # cwd = the notebook's folder
    assert [p.name for p in run.figures] == ["01_x-line.png"]
    assert json.loads(src.read_text())["cells"][0].get("outputs") == []  # source untouched
