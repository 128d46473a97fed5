"""Resolving --model: a backbone file, a run's export, or a run's latest checkpoint."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from app import storage
from app.eval.model_ref import ModelNotFound, arch_name, resolve_model
from app.models import VisionTransformer, export_backbone


def _vit(seed: int, dim: int = 32) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(embed_dim=dim, depth=2, num_heads=1, img_size=28).eval()


def _same(a, b) -> bool:
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_arch_name_uses_our_size_names_and_register_suffix():
    def shape(dim, depth, regs=0):
        return SimpleNamespace(embed_dim=dim, depth=depth, num_register_tokens=regs)

    assert arch_name(shape(192, 12)) == "vit_tiny" and arch_name(shape(1536, 40)) == "vit_giant2"
    assert arch_name(shape(384, 12, 4)) == "vit_small_reg4"
    assert arch_name(_vit(0)) == "vit_32d2"


def test_resolves_backbone_file_and_run_export(tmp_path):
    model = _vit(0)
    f = (tmp_path / "b.pth").as_uri()
    export_backbone(model, f)
    ref = resolve_model(f)
    assert ref.run_uri is None and _same(ref.model, model)
    run = (tmp_path / "runs" / "r").as_uri()
    export_backbone(model, storage.join(run, "export", "backbone.pth"))
    ref = resolve_model(run)
    assert ref.run_uri == run and ref.source.endswith("export/backbone.pth") and _same(ref.model, model)


def test_run_without_export_uses_latest_checkpoint_preferring_the_student_ema(tmp_path):
    teacher, ema = _vit(1), _vit(2)
    state = {**{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
             **{f"student_ema.backbone.{k}": v for k, v in ema.state_dict().items()},
             "dino_center": torch.zeros(1, 8)}
    run = (tmp_path / "runs" / "d").as_uri()
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.put_bytes(storage.join(run, "checkpoints", "step-00000004", "teacher.pt"), buf.getvalue())
    storage.put_bytes(storage.join(run, "checkpoints", "LATEST"), b"step-00000004")
    ref = resolve_model(run)
    assert ref.source.endswith("step-00000004") and _same(ref.model, ema)


def test_missing_model_is_a_named_error(tmp_path):
    with pytest.raises(ModelNotFound, match="neither a backbone file nor a run"):
        resolve_model((tmp_path / "nothing").as_uri())
