"""`dinoctl export`: a run's latest checkpoint -> official-schema backbone + heads + config."""

from __future__ import annotations

import io

import pytest
import torch

from app import storage
from app.config import load_config
from app.models import build_backbone


@pytest.fixture
def checkpointed_run(tmp_path):
    """A run directory laid out like app/train/checkpoint.py writes it (teacher.pt + LATEST)."""
    from app.ssl.meta_arch import LossWeights, SSLMetaArch, build_network

    cfg = load_config("demo", ["dino.head_n_prototypes=64", "ibot.head_n_prototypes=64"])
    torch.manual_seed(0)
    meta = SSLMetaArch(build_network(cfg), LossWeights.from_config(cfg))
    with torch.no_grad():  # make the teacher differ from a fresh init
        for p in meta.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = (tmp_path / "store" / "runs" / "demo").as_uri()
    buf = io.BytesIO()
    torch.save(meta.state_dict(), buf)
    for step in (5, 10):
        storage.put_bytes(storage.join(run, "checkpoints", f"step-{step:08d}", "teacher.pt"), buf.getvalue())
    storage.put_bytes(storage.join(run, "checkpoints", "LATEST"), b"step-00000010")
    return run, meta, cfg


def test_export_from_checkpoint_loads_strictly_and_gives_identical_features(checkpointed_run, tmp_path, capsys):
    from app.cli import main

    run, meta, cfg = checkpointed_run
    assert main(["export", run]) == 0
    assert "step-00000010" in capsys.readouterr().out
    export = tmp_path / "store" / "runs" / "demo" / "export"
    assert {p.name for p in export.iterdir()} >= {"backbone.pth", "heads.pth", "config.yaml", "summary.json", "_SUCCESS"}

    sd = torch.load(export / "backbone.pth", map_location="cpu", weights_only=True)
    assert "cls_token" in sd and "blocks.11.mlp.fc2.weight" in sd and not any(k.startswith("teacher") for k in sd)
    model = build_backbone(cfg.model.arch, img_size=cfg.model.img_size, patch_size=14)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), meta.teacher.backbone.eval()(x))

    heads = torch.load(export / "heads.pth", map_location="cpu", weights_only=True)
    for key, value in meta.teacher.dino_head.state_dict().items():
        assert torch.equal(heads["dino_head"][key], value)
    assert load_config(str(export / "config.yaml")).model.arch == "vit_tiny"

    # A second export to another place copies the existing export.
    other = (tmp_path / "copy").as_uri()
    assert main(["export", run, "--out", other]) == 0
    assert (tmp_path / "copy" / "backbone.pth").read_bytes() == (export / "backbone.pth").read_bytes()
    assert (tmp_path / "copy" / "_SUCCESS").exists()


def test_export_of_a_run_without_checkpoint_or_export_is_a_one_line_error(tmp_path, capsys):
    from app.cli import main

    assert main(["export", (tmp_path / "runs" / "empty").as_uri()]) == 2
    err = capsys.readouterr().err
    assert "no export/ and no checkpoints/LATEST" in err and err.count("\n") == 1
