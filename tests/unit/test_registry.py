"""The model registry: publish, list, card, load by name from a folder or a file:// URI; unknown names and
overwrites fail in one line; quantize publishes a card with every field the issue asks for; the CLI prints it."""

from __future__ import annotations

import json

import pytest
import torch

from app.errors import UserError
from app.registry import ModelNotFound, Registry, load_artifact
from tests.conftest import run_cli
from tests.unit.tiny_models import tiny_setup


@pytest.fixture(scope="module")
def fp32():
    return tiny_setup()  # (data folder, fp32 artifact folder)


@pytest.fixture(scope="module")
def quantized(fp32, tmp_path_factory):
    """The tiny model quantized to int8 by the real pipeline into a fresh registry, with 3 QAT steps as well."""
    from pipelines import quantize

    data, artifact = fp32
    root = tmp_path_factory.mktemp("registry")
    Registry(root).publish("tiny", artifact)
    ptq = quantize.run("tiny", "int8", registry=str(root), batches=2)
    qat = quantize.run("tiny", "qat", registry=str(root), steps=3, batches=2)
    return root, ptq, qat


def test_publish_list_card_and_load(fp32, tmp_path):
    _, artifact = fp32
    reg = Registry(tmp_path / "reg")
    assert reg.names() == [] and not reg.exists("tiny")
    path = reg.publish("tiny", artifact)
    assert path == str((tmp_path / "reg" / "tiny").resolve()) and reg.exists("tiny")
    assert [c["name"] for c in reg.list()] == ["tiny"]
    card = reg.card("tiny")
    assert card["name"] == "tiny" and card["parameters"] == 136_960 and card["quantization"] is None
    assert not list((tmp_path / "reg").glob(".*partial"))  # the staging folder was moved into place
    art = load_artifact("tiny", registry=str(tmp_path / "reg"))
    ref = load_artifact(artifact)
    assert all(torch.equal(a, b) for a, b in zip(art.model.state_dict().values(), ref.model.state_dict().values()))


def test_quantize_refuses_an_existing_name_before_working(quantized):
    from pipelines import quantize

    root, _, _ = quantized
    with pytest.raises(UserError, match="model 'tiny-int8' already exists in registry"):
        quantize.run("tiny", "int8", registry=str(root), data="/no/such/data")  # fails before touching the data
    with pytest.raises(UserError, match="--steps 0: QAT needs at least one training step"):
        quantize.run("tiny", "qat", registry=str(root), data="/no/such/data", steps=0, name="fresh")


def test_publish_refuses_to_overwrite_unless_asked(fp32, tmp_path):
    _, artifact = fp32
    reg = Registry(tmp_path)
    reg.publish("tiny", artifact)
    with pytest.raises(UserError, match="model 'tiny' already exists in registry .*--overwrite") as err:
        reg.publish("tiny", artifact)
    assert "\n" not in str(err.value)
    reg.publish("tiny", artifact, overwrite=True, card={"note": "second"})
    assert reg.card("tiny")["note"] == "second" and reg.names() == ["tiny"]
    with pytest.raises(UserError, match="model name 'a/b' is not valid"):
        reg.publish("a/b", artifact)


def test_file_uri_registry(fp32, tmp_path):
    _, artifact = fp32
    uri = (tmp_path / "uri-reg").as_uri()  # file:///...
    reg = Registry(uri)
    reg.publish("tiny", artifact)
    art = reg.load("tiny")
    x = torch.arange(16).view(1, 16)
    with torch.no_grad():
        assert torch.equal(art.model(x)[0], load_artifact(artifact).model(x)[0])
    assert (tmp_path / "uri-reg" / "tiny" / "model_card.json").is_file()
    assert load_artifact("tiny", registry=uri).card["name"] == "tiny"


def test_unknown_model_names_the_closest(fp32, tmp_path, monkeypatch):
    _, artifact = fp32
    reg = Registry(tmp_path)
    for name in ("tiny", "tiny-int8", "small"):
        reg.publish(name, artifact)
    monkeypatch.setenv("SCALESTACK_REGISTRY", str(tmp_path))  # the default registry follows the variable
    with pytest.raises(ModelNotFound) as err:
        load_artifact("tiny-int9")
    msg = str(err.value)
    assert "unknown model 'tiny-int9'" in msg and "did you mean 'tiny-int8', 'tiny'" in msg
    assert "`python -m app models list`" in msg and "\n" not in msg
    with pytest.raises(ModelNotFound, match="no model artifact at /no/such/folder"):
        load_artifact("/no/such/folder")
    with pytest.raises(ModelNotFound, match="it is empty"):
        Registry(tmp_path / "empty").card("x")


def test_quantized_card_holds_the_issue_fields(quantized):
    root, ptq, qat = quantized
    card = Registry(root).card("tiny-int8")
    assert card["parameters"] == 136_960  # the model's parameters, not the stored tensors' count
    assert card["bytes"] == (root / "tiny-int8" / "model.safetensors").stat().st_size < 0.6 * ptq.before.bytes
    assert card["quantization"] == "int8-dynamic"
    qc = card["quantization_config"]
    assert qc["backend"] == "torch.ao" and qc["fallback"] is None and "int8" in qc["storage"]
    assert "head.lm_head" in qc["layers"] and len(qc["layers"]) == 2 * 4 + 1  # 4 Linears per block + the head
    assert set(card["val_loss_per_domain"]) == {"code", "docs"}
    assert card["val_loss_per_domain"]["code"] == pytest.approx(ptq.after.val_loss["code"], abs=1e-5)
    assert set(card["tokens_per_s"]) == {"batch_1", "batch_16"} and min(card["tokens_per_s"].values()) > 0
    assert {"platform", "cpu", "cpu_count", "torch_threads"} <= set(card["machine"])
    assert card["lineage"]["parent"] == "tiny" and card["lineage"]["source_run"] == "tiny-test"
    assert card["lineage"]["config_hash"] == "0123456789abcdef" and card["lineage"]["teacher"] is None
    assert card["created"] and card["model_config"]["n_layer"] == 2


def test_quantized_artifact_evaluates_like_the_run_that_made_it(quantized):
    """The published model, loaded back, gives exactly the validation losses measured before saving."""
    from app.evaluate import evaluate

    root, ptq, qat = quantized
    for result in (ptq, qat):
        again = evaluate(result.name, registry=str(root), batches=2, speed=False)
        assert again.val_loss == result.after.val_loss
    card = Registry(root).card("tiny-qat")
    assert card["quantization"] == "int8-dynamic" and card["quantization_config"]["qat"]["steps"] == 3
    assert list(qat.compared) == ["PTQ int8", "fine-tune + PTQ"]
    assert len({str(r.val_loss) for r in (*qat.compared.values(), qat.after)}) == 3  # three different models
    assert qat.columns() == ["metric", "fp32", "PTQ int8", "fine-tune + PTQ", "QAT int8", "QAT int8 vs fp32"]
    assert all(len(row) == 6 for row in qat.rows())


def test_cli_models_quantize_and_eval(quantized):
    root, _, _ = quantized
    listing = run_cli("models", "list", "--registry", str(root))
    assert listing.returncode == 0, listing.stderr
    for text in ("tiny-int8", "tiny-qat", "int8-dynamic torch.ao", "fp32", "136,960", "loss code", "loss docs"):
        assert text in listing.stdout
    assert "does not exist yet" not in listing.stdout
    shown = run_cli("models", "show", "tiny-int8", "--registry", str(root))
    assert json.loads(shown.stdout)["quantization"] == "int8-dynamic"
    missing = run_cli("models", "list", "--registry", str(root / "typo"))  # empty, and says why
    assert missing.returncode == 0 and "0 models" in missing.stdout and "typo does not exist yet" in missing.stdout
    for args, match in [
        (["quantize", "tiny-int8", "--registry", str(root)], "already quantized (int8-dynamic); quantize its fp32 "
                                                             "parent tiny instead"),
        (["eval", "tiny-int9", "--registry", str(root)], "unknown model 'tiny-int9' in registry"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert match in result.stderr and "Traceback" not in result.stderr
    bad = run_cli("quantize", "tiny", "--method", "int3")
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr
