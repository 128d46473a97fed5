"""The eval stage end to end: synthetic labelled data, a tiny random ViT, summary + MLflow."""

from __future__ import annotations

import json

import pytest
import torch

from app import storage
from app.data.synth import synthesize
from app.models import export_backbone, vit_tiny


@pytest.fixture
def eval_setup(dinoctl_home, tmp_path):
    store = (tmp_path / "store").as_uri()
    data = storage.join(store, "datasets", "synth")
    synthesize(data, n_pool=0, n_seeds=0, n_eval_train=48, n_eval_val=24, image_size=32, n_corrupt=0)
    torch.manual_seed(0)
    export_backbone(vit_tiny(depth=2, img_size=28), storage.join(store, "runs", "pre", "export", "backbone.pth"))
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
run: {{name: ev, store: "{store}", experiment: eval-test}}
eval:
  model: "{store}/runs/pre"
  train: "{data}/eval_train"
  val: "{data}/eval_val"
  image_size: 28
  batch_size: 16
  linear_features: cls+mean
  linear_epochs: 10
  linear_lrs: [0.01, 0.1]
  linear_wds: [0.0]
""")
    return store, data, config


def test_eval_stage_writes_summary_png_success_and_logs_to_mlflow(eval_setup, tmp_path):
    from app.eval.run import main
    from app.tracking import Tracker

    store, data, config = eval_setup
    assert main(["eval", "--config", str(config)]) == 0
    out = tmp_path / "store" / "runs" / "ev" / "eval"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "_SUCCESS").exists() and (out / "confusion_knn_k20.png").stat().st_size > 1000
    assert set(summary["knn"]["top1"]) == {"10", "20", "100", "200"}
    assert summary["knn"]["k_used"] == {"10": 10, "20": 20, "100": 48, "200": 48}
    assert summary["counts"] == {"train": 48, "val": 24, "train_corrupt": 0, "val_corrupt": 0}
    assert 0.0 <= summary["linear"]["top1"] <= 100.0 and summary["linear"]["features"] == "cls+mean"
    assert len(summary["knn"]["per_class_top1"]) == 8
    assert summary["model"]["run"] == f"{store}/runs/pre"
    assert summary["features_from_cache"] == {"train": False, "val": False}

    client = Tracker().client
    runs = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["knn_top1_k20"] == summary["knn"]["top1"]["20"]
    assert runs[0].data.tags["eval_set"] == summary["eval_set"]["id"]
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval")}
    assert {"eval/summary.json", "eval/confusion_knn_k20.png", "eval/confusion_linear.png"} <= artifacts

    # Second run: same model and data -> features come from the cache, same k-NN numbers.
    assert main(["eval", "--config", str(config), "--no-linear"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["features_from_cache"] == {"train": True, "val": True}
    assert again["knn"]["top1"] == summary["knn"]["top1"]


def test_eval_knn_command_prints_top1_per_k(eval_setup, capsys):
    from app.cli import main

    store, data, _ = eval_setup
    code = main(["eval", "knn", "--model", f"{store}/runs/pre", "--train", f"{data}/eval_train",
                 "--val", f"{data}/eval_val", "--set", "eval.image_size=28", "--set", f"run.store={store}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "k-NN k=20" in out and "k-NN k=200  (used 48" in out


def test_eval_stage_with_missing_dataset_fails_with_a_named_error(eval_setup, capsys):
    from app.eval.run import main

    _, _, config = eval_setup
    assert main(["eval", "--config", str(config), "--set", "eval.val="]) == 2
    assert "eval.val is empty" in capsys.readouterr().err
