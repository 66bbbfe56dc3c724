"""notebooks/quickstart.ipynb executed top to bottom with nbclient, on its own kernel (and its own embedded Ray).

To stay within the suite's time, it gets the session's tiny data set and resumes the smoke sweep that
tests/integration/test_sweep.py trained (a finished sweep re-run trains nothing: that path is part of what is tested).
"""

import json

import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def executed(smoke, tiny_data, tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    out = tmp_path_factory.mktemp("notebook")
    env = {"SCALESTACK_NB_OUT": str(out), "SCALESTACK_NB_DATA": str(tiny_data), "SCALESTACK_NB_STEPS": "12",
           "SCALESTACK_NB_SWEEP": str(REPO / "tune_configs" / "smoke.yaml"),
           "SCALESTACK_NB_SWEEP_DIR": str(smoke.sweep_dir)}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        for key, value in env.items():
            mp.setenv(key, value)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
                       ).execute()
    return nb, out


def _outputs(nb, kind):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if o.output_type == kind]


@pytest.mark.slow
def test_quickstart_runs_every_step_and_reports_it(executed):
    nb, out = executed
    assert not _outputs(nb, "error")
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    line = next(ln for ln in text.splitlines() if ln.startswith("NOTEBOOK_RESULT "))
    r = json.loads(line.removeprefix("NOTEBOOK_RESULT "))
    t = r["teacher"]
    assert t["world_sizes"] == [2] and t["zero_stage"] == 2 and t["steps"] == 12 and t["final_loss"] < t["first_loss"]
    assert r["sweep"] == {"trials": 6, "ok": 6, "resumed": True}  # the smoke sweep, resumed: nothing retrained
    assert r["fit"]["n_points"] == 6 and all(v == v for v in r["fit"]["params"].values())  # finite (no NaN)
    assert r["plan"]["n_params"] > 0 and r["plan"]["n_tokens"] > 0 and r["plan"]["cost_usd"] > 0
    assert r["specialist"]["domains"] == ["code"]
    assert r["quantized"] == {"name": "code-specialist-int8", "method": "int8"}
    # the domain policy: the code prompt goes to the code specialist, the prose one to the teacher (default)
    assert r["routes"] == {"def read_config(path):\n    ": "code-int8", "The with statement is used to": "teacher"}
    assert (out / "fit" / "loss_vs_compute.png").stat().st_size > 5000 and (out / "registry" / "code-specialist-int8").is_dir()


@pytest.mark.slow
def test_quickstart_shows_tables_and_plots(executed):
    nb, _ = executed
    rich = _outputs(nb, "execute_result") + _outputs(nb, "display_data")
    tables = [o for o in rich if o.get("data", {}).get("text/html", "").startswith("<table>")]
    pngs = [o for o in rich if "image/png" in o.get("data", {})]
    assert len(tables) == 4  # the train, sweep, plan and quantize results
    stderr = "".join(o.get("text", "") for o in _outputs(nb, "stream") if o.get("name") == "stderr")
    # progress as plain text, each bar printed once when it ends: no redraws, no rich widget warning
    assert "training teacher" in stderr and "\x1b[2K" not in stderr and 'install "ipywidgets"' not in stderr
    assert len(pngs) >= 2  # the loss curve and the fit's loss-vs-compute plot
