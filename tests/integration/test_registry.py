"""Model registry: `dinov2-<arch>` versions, `candidate` / `champion` aliases, loading by alias."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from app import storage
from app.eval.features import model_fingerprint
from app.models import VisionTransformer, export_backbone


def _vit(seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(embed_dim=32, depth=2, num_heads=1, img_size=28).eval()


def _run_with_eval(store: str, name: str, model: VisionTransformer, knn20: float, eval_set: str = "set-1") -> str:
    """A run with an exported backbone and an eval summary of it."""
    run = storage.join(store, "runs", name)
    export_backbone(model, storage.join(run, "export", "backbone.pth"))
    storage.put_json(storage.join(run, "eval", "summary.json"), {
        "model": {"uri": run, "fingerprint": model_fingerprint(model)},
        "eval_set": {"id": eval_set, "image_size": 28, "train": "file:///t", "val": "file:///v"},
        "knn": {"top1": {"10": knn20 - 1.0, "20": knn20}}, "linear": {"top1": knn20 + 2.0},
    })
    return run


def _features(model, sizes=(28, 42)) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(s))) for s in sizes]


def _champion(name: str, uri: str | None = None):
    from app.eval.mlflow_model import load_registered

    return load_registered(name, "champion", uri)


def test_champion_moves_only_on_improvement_and_loads_by_alias(dinoctl_home, tmp_path, capsys):
    from app.cli import main as cli
    from app.eval.registry_run import main as register_stage
    from app.eval.mlflow_model import registry_client

    store = (tmp_path / "store").as_uri()
    a, b, c = _vit(0), _vit(1), _vit(2)
    _run_with_eval(store, "first", a, 50.0)
    config = tmp_path / "c.yaml"
    config.write_text(f'run: {{name: first, store: "{store}"}}\n')

    # The pipeline's register stage: first version, no champion yet -> champion.
    assert register_stage(["register", "--config", str(config)]) == 0
    result = json.loads((tmp_path / "store" / "runs" / "first" / "register" / "summary.json").read_text())
    assert (tmp_path / "store" / "runs" / "first" / "register" / "_SUCCESS").exists()
    assert result["name"] == "dinov2-vit_32d2" and result["version"] == "1" and result["champion_moved"]
    loaded = _champion("dinov2-vit_32d2")
    for got, want in zip(_features(loaded), _features(a)):
        assert torch.allclose(got, want, atol=1e-6)

    # Worse on the same evaluation set: candidate only.
    assert cli(["register", _run_with_eval(store, "worse", b, 40.0)]) == 0
    assert "does not beat champion v1" in capsys.readouterr().out
    client = registry_client()
    assert str(client.get_model_version_by_alias("dinov2-vit_32d2", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("dinov2-vit_32d2", "candidate").version) == "2"

    # Better on the same evaluation set: champion moves, and loads as that model.
    assert cli(["register", _run_with_eval(store, "better", c, 60.0)]) == 0
    assert "beats champion v1" in capsys.readouterr().out
    mv = client.get_model_version_by_alias("dinov2-vit_32d2", "champion")
    assert str(mv.version) == "3" and mv.tags["knn_top1_k20"] == "60.0000" and mv.tags["eval_set"] == "set-1"
    for got, want in zip(_features(_champion("dinov2-vit_32d2")), _features(c)):
        assert torch.allclose(got, want, atol=1e-6)

    assert cli(["models", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:4] == ["name", "version", "aliases", "knn_top1_k20"]
    assert cli(["models", "list", "--json"]) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["3"]["aliases"] == ["candidate", "champion"] and rows["3"]["knn_top1_k20"] == "60.0000"
    assert rows["1"]["aliases"] == [] and rows["1"]["knn_top1_k20"] == "50.0000"
    assert rows["2"]["aliases"] == [] and rows["2"]["run_uri"].endswith("/runs/worse")


def test_register_refuses_an_eval_summary_of_another_model(dinoctl_home, tmp_path, capsys):
    from app.cli import main as cli

    store = (tmp_path / "store").as_uri()
    run = _run_with_eval(store, "x", _vit(0), 50.0)
    export_backbone(_vit(5), storage.join(run, "export", "backbone.pth"))  # retrained after eval
    assert cli(["register", run]) == 2
    assert "evaluated another model" in capsys.readouterr().err


@pytest.mark.slow
def test_registered_model_loads_by_alias_from_the_mlflow_server(mlflow_server, s3_env, tmp_path, monkeypatch):
    from app.eval.registry_run import register_model_uri
    from app.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    store = (tmp_path / "store").as_uri()
    model = _vit(3)
    run = _run_with_eval(store, "srv", model, 70.0)
    name = f"dinov2-test-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(uri=mlflow_server.uri, experiment="registry-test")
    with tracker.start("register", run_name="register"):
        result = register_model_uri(run, storage.join(run, "eval", "summary.json"), tracker, name)
    assert result["champion_moved"] and result["aliases"] == ["candidate", "champion"]
    loaded = _champion(name, mlflow_server.uri)
    for got, want in zip(_features(loaded), _features(model)):
        assert torch.allclose(got, want, atol=1e-6)
