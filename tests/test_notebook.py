"""notebooks/walkthrough.ipynb: kept in git without outputs, and executed top to bottom (nbclient,
a real ipykernel on this .venv's Python) on the tiny model: data, training as a subprocess, the
loss curves, the evaluation table, questions through the worker."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from core import paths

ROOT = Path(__file__).resolve().parents[1]
TINY_DEMO = (
    ROOT / "tests" / "fixtures" / "tiny-demo.yaml"
)  # the tiny model's settings (train/demo.yaml is SmolLM2's)
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
QUESTIONS = ["Em que ano foi fundado o Sporting Clube Farense?", "Qual é o estádio do Farense?"]


def read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebook_is_kept_without_outputs():
    nb = read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for i, cell in enumerate(code):
        assert cell.outputs == [], (
            f"code cell {i} has outputs: strip them (Edit > Clear Outputs of All Cells)"
        )
        assert cell.execution_count is None, f"code cell {i} has an execution count"
        assert not set(cell.metadata) - {"tags"}, f"code cell {i} metadata: {dict(cell.metadata)}"
    assert [c for c in code if "parameters" in c.metadata.get("tags", [])], "a cell tagged 'parameters'"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec for this Python (not whatever `python3` kernel the machine has), and the run's
    outputs (MODELS_DIR, LOGS_DIR) in tmp_path, for the kernel and the commands it starts."""
    spec = tmp_path / "jupyter" / "kernels" / "farense-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "farense", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    env = paths.env_with_outputs_in(tmp_path)
    env["JUPYTER_PATH"] = str(tmp_path / "jupyter")
    env.pop("TRAIN_STEP_DELAY_S", None)
    env.pop("TRAIN_INJECT_NAN", None)
    return env


def execute(nb, env, timeout=600):
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="farense-test",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, on any error
    return nb


def with_parameters(nb, source):
    """The notebook with a cell setting `source` right after the parameters cell (as papermill does)."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source))
    return nb


def text_of(cell):
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append(o.text)
        elif "data" in o:
            out.append(o.data.get("text/markdown", "") + o.data.get("text/plain", ""))
    return "".join(out)


def test_the_notebook_runs_top_to_bottom_on_the_tiny_model(tmp_path, kernel_env):
    nb = with_parameters(
        read(),
        f"MODEL = {str(paths.TINY_MODEL)!r}\nCONFIG = {str(TINY_DEMO)!r}\nRAW = {str(ROOT / 'data' / 'sample')!r}\n"
        f"DATA = {str(tmp_path / 'data')!r}\nITERS = 20\nFRESH = True\nEVAL_LIMIT = 3\nQUESTIONS = {QUESTIONS!r}",
    )
    execute(nb, kernel_env)
    code = [c for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(text_of(c) for c in code)

    run = tmp_path / "models" / "walkthrough"
    assert (run / "adapters.safetensors").is_file(), "training wrote the run under MODELS_DIR"
    assert (tmp_path / "logs" / "walkthrough" / "metrics.jsonl").is_file()
    assert re.search(r"train: step +20/20 ", everything), everything[-3000:]
    assert "MASKED |" in everything and "TRAINED |" in everything, "examples shown as the model sees them"

    images = [o for c in code for o in c.outputs if "data" in o and "image/png" in o.data]
    assert len(images) == 1, "the loss curves"
    assert "| metric | base | fine-tuned |" in everything, "the evaluation table"
    assert json.loads((run / "eval.json").read_text())["data"]["count"] == 3

    chat = text_of(code[-1])
    for q in QUESTIONS:
        assert f"Q: {q}\nA: " in chat
    answers = [line[3:] for line in chat.splitlines() if line.startswith("A: ")]
    assert len(answers) == 2 and all(answers), chat
    assert f"+ {run}" in chat, "the worker served the run's adapter"


def test_the_default_model_is_the_demo_configs(tmp_path, kernel_env):
    """MODEL = None: the base model named by CONFIG's `model` (train/demo.yaml: the demo's model)."""
    assert "MODEL = None" in read().cells[1].source
    config = tmp_path / "demo.yaml"
    config.write_text("model: some-org/another-demo-model\n")
    nb = read()
    at = next(i for i, c in enumerate(nb.cells) if "def run(" in c.source)
    nb.cells = nb.cells[: at + 1]  # parameters and set-up only
    execute(with_parameters(nb, f"CONFIG = {str(config)!r}"), kernel_env, timeout=120)
    assert "base model some-org/another-demo-model" in text_of(nb.cells[at + 1])
