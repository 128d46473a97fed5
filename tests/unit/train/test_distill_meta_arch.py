"""Distillation meta-architecture: frozen teacher, unmasked student, all-patch iBOT, student EMA
(real ViTs, heads and losses at tiny sizes, CPU)."""

import numpy as np
import pytest
import torch

from app.config import load_config
from app.ssl.ibot_loss import ibot_patch_loss
from app.ssl.masking import BlockMaskGenerator, collate_data_and_masks
from app.ssl.meta_arch import LossWeights, build_network
from app.ssl.distill_meta_arch import DistillMetaArch, all_patch_targets, build_student, check_compatible
from app.train.distill import prepare_config

TEACHER_RUN = "file:///nonexistent/store/runs/teacher"


def _cfg(*extra):
    return load_config("demo", [
        "model.img_size=42", "crops.global_crops_size=42", "crops.local_crops_size=14",
        "dino.head_n_prototypes=32", "ibot.head_n_prototypes=24", "dino.head_hidden_dim=16",
        "dino.head_bottleneck_dim=8", "ibot.head_hidden_dim=16", "ibot.head_bottleneck_dim=8",
        "ibot.separate_head=true", "model.drop_path_rate=0.0", "student.img_size=42",
        "student.embed_dim=64", "student.depth=2", f"distill.teacher={TEACHER_RUN}",
        "run.name=distilled", *extra])


def _batch(b=4, n_local=2, seed=0, mask_probability=0.0):
    g = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, 42, 42, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 14, 14, generator=g) for _ in range(n_local)]}
               for _ in range(b)]
    return collate_data_and_masks(samples, (0.1, 0.5), mask_probability, 9, BlockMaskGenerator((3, 3)),
                                  rng=np.random.default_rng(seed))


def _parts(*extra):
    cfg = prepare_config(_cfg(*extra))
    torch.manual_seed(0)
    teacher = build_network(cfg)
    torch.manual_seed(1)
    student = build_student(cfg, teacher)
    meta = DistillMetaArch(teacher, student, LossWeights.from_config(cfg), patch_size=14)
    return cfg, teacher, student, meta


def test_student_is_smaller_and_predicts_over_the_teachers_prototypes():
    _, teacher, student, _ = _parts("dino.head_n_prototypes=48")
    assert student.backbone.embed_dim == 64 and len(student.backbone.blocks) == 2
    assert student.backbone.blocks[0].attn.num_heads == 1  # 64-d heads
    assert student.dino_head.out_dim == teacher.dino_head.out_dim == 48
    assert student.ibot_head.out_dim == teacher.ibot_head.out_dim == 24


def test_checkpoint_state_holds_the_student_ema_and_centers_but_not_the_teacher():
    _, teacher, student, meta = _parts()
    keys = set(meta.state_dict())
    assert {"dino_center", "ibot_center"} <= keys
    assert all(k.startswith("student_ema.") or k.endswith("_center") for k in keys)
    assert {k[len("student_ema."):] for k in keys if k.startswith("student_ema.")} == set(student.state_dict())
    assert meta.teacher is teacher and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(not p.requires_grad for p in meta.student_ema.parameters())


def test_student_sees_no_mask_and_ibot_covers_every_global_crop_patch():
    _, _, student, meta = _parts()
    batch = _batch(b=4)
    s_out = meta.get_student_output(student, batch)
    t_out = meta.get_teacher_output(batch, teacher_temp=0.04)
    assert s_out["masked_patch_logits"].shape == (8 * 9, 24)
    assert t_out["ibot_probs"].shape == (8 * 9, 24) and t_out["dino_probs"].shape == (8, 32)
    # Unmasked: the student's patch outputs are those of a plain forward pass.
    plain = student.backbone.forward_features(batch["collated_global_crops"])["x_norm_patchtokens"]
    expected = student.ibot_head(plain.flatten(0, 1))
    assert torch.allclose(s_out["masked_patch_logits"], expected, atol=1e-5)
    losses = meta.compute_losses(s_out, t_out, batch)
    # all-patch iBOT equals the dense loss with every patch "masked" (an independent code path)
    dense = ibot_patch_loss(s_out["masked_patch_logits"].view(8, 9, 24), t_out["ibot_probs"].view(8, 9, 24),
                            torch.ones(8, 9, dtype=torch.bool))
    assert torch.allclose(losses["ibot_loss"], dense, atol=1e-6)
    losses["total_loss"].backward()
    assert student.backbone.mask_token.grad is None or not student.backbone.mask_token.grad.any()
    assert student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_a_training_step_moves_the_student_and_its_ema_but_never_the_teacher():
    _, teacher, student, meta = _parts()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_before = {k: v.clone() for k, v in meta.student_ema.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for step in range(3):
        batch = _batch(seed=step)
        losses = meta.compute_losses(meta.get_student_output(student, batch),
                                     meta.get_teacher_output(batch, 0.04), batch)
        opt.zero_grad()
        losses["total_loss"].backward()
        opt.step()
        meta.update_teacher(student, momentum=0.5)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
    key = "backbone.blocks.0.attn.qkv.weight"
    s, e, e0 = student.state_dict()[key], meta.student_ema.state_dict()[key], ema_before[key]
    assert not torch.equal(e, e0) and not torch.allclose(e, s)
    # the EMA lies between its start and the student: closer to the student than it started
    assert (e - s).norm() < (e0 - s).norm()


def test_ema_update_is_the_exact_momentum_average():
    _, _, student, meta = _parts()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in meta.student_ema.named_parameters()}
    meta.update_teacher(student, momentum=0.75)
    for k, p in student.named_parameters():
        assert torch.allclose(meta.student_ema.get_parameter(k), 0.75 * before[k] + 0.25 * p, atol=1e-6)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_teacher_targets_are_distributions_for_both_centerings(centering):
    _, _, _, meta = _parts(f"train.centering={centering}")
    out = meta.get_teacher_output(_batch(), teacher_temp=0.07)
    for probs in out.values():
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-4)
    if centering == "centering":
        assert meta.dino_center.abs().sum() > 0 and meta.ibot_center.abs().sum() > 0


def test_incompatible_student_heads_or_patches_are_refused():
    cfg, teacher, _, _ = _parts()
    other = build_network(load_config("demo", ["dino.head_n_prototypes=16", "model.img_size=42"]))
    with pytest.raises(ValueError, match="DINO head has 16 prototypes"):
        check_compatible(teacher, other)
    patch16 = build_network(load_config("demo", [
        "model.patch_size=16", "model.img_size=48", "crops.global_crops_size=48",
        "crops.local_crops_size=16", "dino.head_n_prototypes=32", "ibot.separate_head=true",
        "ibot.head_n_prototypes=24"]))
    with pytest.raises(ValueError, match="patch size 16"):
        check_compatible(teacher, patch16)


def test_all_patch_targets_weigh_each_image_once():
    t = all_patch_targets(3, 4, torch.device("cpu"))
    assert not t["masks"].any() and t["masks"].shape == (3, 4)
    assert torch.equal(t["patch_indices"], torch.arange(12))
    assert torch.allclose(t["patch_weight"].view(3, 4).sum(1), torch.ones(3))


def test_masked_ibot_targets_are_the_collates_subset_of_the_unmasked_students_patches():
    """`distill.ibot_patches: masked` (DINOv3's distillation code): the student still sees every
    patch, and the iBOT loss is the dense loss restricted to the collate's masks."""
    cfg, teacher, student, _ = _parts("distill.ibot_patches=masked")
    assert cfg.ibot.mask_sample_probability == 0.5  # kept: the masks pick the targets
    meta = DistillMetaArch(teacher, student, LossWeights.from_config(cfg), patch_size=14,
                           ibot_patches="masked")
    every = DistillMetaArch(teacher, student, LossWeights.from_config(cfg), patch_size=14)
    batch = _batch(b=4, mask_probability=1.0, seed=3)
    masks = batch["collated_masks"]
    assert 0 < int(masks.sum()) < masks.numel()
    s_out = meta.get_student_output(student, batch)
    t_out = meta.get_teacher_output(batch, teacher_temp=0.04)
    m = int(masks.sum())
    assert s_out["masked_patch_logits"].shape == (m, 24) and t_out["ibot_probs"].shape == (m, 24)
    s_all = every.get_student_output(student, batch)
    t_all = every.get_teacher_output(batch, teacher_temp=0.04)
    # the same (unmasked) student pass, the same teacher targets, at the masked positions
    assert torch.allclose(s_out["masked_patch_logits"], s_all["masked_patch_logits"][masks.flatten()], atol=1e-5)
    assert torch.allclose(t_out["ibot_probs"], t_all["ibot_probs"][masks.flatten()], atol=1e-5)
    assert torch.allclose(s_out["global_logits"], s_all["global_logits"], atol=1e-6)
    loss = meta.compute_losses(s_out, t_out, batch)["ibot_loss"]
    dense = ibot_patch_loss(s_all["masked_patch_logits"].view(8, 9, 24), t_all["ibot_probs"].view(8, 9, 24), masks)
    assert torch.allclose(loss, dense, atol=1e-6)


def test_masked_ibot_targets_need_a_mask_probability():
    from app.train.distill import DistillSetupError

    with pytest.raises(DistillSetupError, match="mask_sample_probability"):
        prepare_config(_cfg("distill.ibot_patches=masked", "ibot.mask_sample_probability=0"))
