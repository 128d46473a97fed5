"""Student/teacher meta-architecture with the real ViT, heads and losses (tiny sizes, CPU)."""

import numpy as np
import torch

from app.config import load_config
from app.ssl.masking import BlockMaskGenerator, collate_data_and_masks
from app.ssl.meta_arch import LossWeights, SSLMetaArch, build_network


def _cfg(*extra):
    return load_config("demo", ["model.img_size=42", "crops.global_crops_size=42",
                                "crops.local_crops_size=14", "dino.head_n_prototypes=32",
                                "ibot.head_n_prototypes=24", "dino.head_hidden_dim=16",
                                "dino.head_bottleneck_dim=8", "ibot.head_hidden_dim=16",
                                "ibot.head_bottleneck_dim=8", "model.drop_path_rate=0.0", *extra])


def _batch(b=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, 42, 42, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 14, 14, generator=g) for _ in range(n_local)]}
               for _ in range(b)]
    return collate_data_and_masks(samples, (0.1, 0.5), 0.5, 9, BlockMaskGenerator((3, 3)),
                                  rng=np.random.default_rng(seed))


def _meta(*extra, full=False):
    """A 2-block vit_tiny (the full 12 blocks with full=True, through build_network)."""
    torch.manual_seed(0)
    cfg = _cfg(*extra)
    if full:
        student = build_network(cfg)
    else:
        from app.models import DINOHead, build_backbone
        from app.ssl.meta_arch import SSLNetwork

        backbone = build_backbone("vit_tiny", depth=2, img_size=42, init_values=1e-5)
        separate = cfg.ibot.separate_head
        student = SSLNetwork(backbone, DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8),
                             DINOHead(192, 24, hidden_dim=16, bottleneck_dim=8) if separate else None)
    return student, SSLMetaArch(student, LossWeights.from_config(cfg))


def test_teacher_is_a_frozen_eval_copy_of_the_student():
    student, meta = _meta()
    meta.train()
    assert not meta.teacher.training
    assert all(not p.requires_grad for p in meta.teacher.parameters())
    for (ks, s), (kt, t) in zip(student.state_dict().items(), meta.teacher.state_dict().items()):
        assert ks == kt and torch.equal(s, t)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(student.parameters(), meta.teacher.parameters()))


def test_losses_and_gradients_flow_to_the_student_only():
    student, meta = _meta()
    batch = _batch()
    t_out = meta.get_teacher_output(batch, teacher_temp=0.04)
    s_out = meta.get_student_output(student, batch)
    m = batch["mask_indices_list"].numel()
    assert s_out["global_logits"].shape == (8, 32) and s_out["local_logits"].shape == (8, 32)
    assert s_out["masked_patch_logits"].shape == (m, 32)  # shared head by default
    losses = meta.compute_losses(s_out, t_out, batch)
    expected = (losses["dino_local_crops_loss"] + losses["dino_global_crops_loss"]
                + losses["ibot_loss"] + 0.1 * losses["koleo_loss"])
    assert torch.allclose(losses["total_loss"], expected)
    losses["total_loss"].backward()
    assert student.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in meta.teacher.parameters())


def test_separate_ibot_head_has_its_own_prototypes():
    student, meta = _meta("ibot.separate_head=true")
    batch = _batch()
    s_out = meta.get_student_output(student, batch)
    t_out = meta.get_teacher_output(batch, 0.04)
    assert s_out["masked_patch_logits"].shape[1] == 24 and t_out["ibot_probs"].shape[1] == 24
    assert meta.ibot_center.shape == (1, 24)


def test_masked_patches_change_the_student_but_not_the_teacher_view():
    student, meta = _meta()
    batch = _batch()
    unmasked = dict(batch, collated_masks=torch.zeros_like(batch["collated_masks"]))
    a = meta.get_student_output(student, batch)["global_cls"]
    b = meta.get_student_output(student, unmasked)["global_cls"]
    masked_images = batch["collated_masks"].any(1)
    assert masked_images.any()
    assert not torch.allclose(a[masked_images], b[masked_images])
    assert torch.allclose(a[~masked_images], b[~masked_images])


def test_centering_moves_the_center_and_sinkhorn_does_not():
    _, meta = _meta()
    meta.get_teacher_output(_batch(), 0.04)
    assert meta.dino_center.abs().sum() > 0 and meta.ibot_center.abs().sum() > 0
    _, sk = _meta("train.centering=sinkhorn_knopp")
    out = sk.get_teacher_output(_batch(), 0.04)
    assert sk.dino_center.abs().sum() == 0
    assert torch.allclose(out["dino_probs"].sum(1), torch.ones(8), atol=1e-4)


def test_update_teacher_is_an_exponential_moving_average():
    student, meta = _meta()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in meta.teacher.parameters()]
    meta.update_teacher(student, momentum=0.9)
    for t0, t1, s in zip(before, meta.teacher.parameters(), student.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s)


def test_state_dict_holds_teacher_and_centers_with_official_prefixes():
    _, meta = _meta("ibot.separate_head=true", full=True)
    keys = meta.state_dict().keys()
    assert "dino_center" in keys and "ibot_center" in keys
    assert "teacher.backbone.cls_token" in keys
    assert any(k.startswith("teacher.dino_head.last_layer.weight_g") for k in keys)
    assert any(k.startswith("teacher.ibot_head.mlp.0.weight") for k in keys)
