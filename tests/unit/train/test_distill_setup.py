"""Distillation set-up: config rules, loading the frozen teacher from a run, the export config,
and the `dinoctl distill` command line (tiny networks, real storage on tmp_path)."""

import argparse
import io

import pytest
import torch
import yaml

from app import storage
from app.config import dump_yaml, load_config
from app.models.convert import export_backbone
from app.ssl.meta_arch import build_network
from app.train import distill_commands
from app.ssl.distill_meta_arch import build_student, head_from_state_dict
from app.train.distill import (DistillSetupError, exported_config, load_teacher, prepare_config,
                               student_ema_schedules)

SMALL = ["model.img_size=42", "crops.global_crops_size=42", "crops.local_crops_size=14",
         "dino.head_n_prototypes=32", "ibot.head_n_prototypes=24", "dino.head_hidden_dim=16",
         "dino.head_bottleneck_dim=8", "ibot.head_hidden_dim=16", "ibot.head_bottleneck_dim=8",
         "model.drop_path_rate=0.0", "student.img_size=42", "student.embed_dim=64", "student.depth=2"]


def _cfg(store, *extra):
    return load_config("demo", [*SMALL, f"run.store={store}", "run.name=distilled",
                                f"distill.teacher={store}/runs/teacher", *extra])


def _write_run(store: str, cfg, heads: bool = True, config: bool = True):
    """A pretraining run's export as `app/train/loop.py::export_run` writes it."""
    torch.manual_seed(3)
    net = build_network(cfg)
    out = storage.join(store, "runs", "teacher", "export")
    export_backbone(net.backbone, storage.join(out, "backbone.pth"))
    if heads:
        buf = io.BytesIO()
        saved = {"dino_head": net.dino_head.state_dict()}
        if net.ibot_head is not None:
            saved["ibot_head"] = net.ibot_head.state_dict()
        torch.save(saved, buf)
        storage.put_bytes(storage.join(out, "heads.pth"), buf.getvalue())
    if config:
        storage.put_bytes(storage.join(out, "config.yaml"), dump_yaml(cfg).encode())
    return net


def test_prepare_config_applies_the_papers_student_rules(tmp_path):
    cfg = prepare_config(_cfg(tmp_path.as_uri(), "student.drop_path_rate=0.2", "distill.max_steps=7"))
    assert cfg.ibot.mask_sample_probability == 0.0  # no masking
    assert cfg.student.drop_path_rate == 0.0  # no stochastic depth
    assert cfg.train.max_steps == 7 and cfg.distill.enabled


@pytest.mark.parametrize("override, message", [
    ("distill.teacher=", "'distill.teacher' is empty"),
    ("student.embed_dim=96", "multiple of 64"),
    ("run.name=teacher", "is the teacher's run"),
    ("distill.student_ema_momentum=1.0", "student_ema_momentum"),
])
def test_bad_distillation_settings_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(DistillSetupError, match=message) as info:
        prepare_config(_cfg(tmp_path.as_uri(), override))
    assert "\n" not in str(info.value)


def test_a_config_without_student_section_is_refused(tmp_path):
    cfg = _cfg(tmp_path.as_uri())
    cfg.student = None
    with pytest.raises(DistillSetupError, match="student"):
        prepare_config(cfg)


def test_teacher_is_rebuilt_from_the_run_export_with_its_own_architecture(tmp_path):
    store = tmp_path.as_uri()
    # the teacher run had a separate iBOT head and 40 prototypes; the distill config says otherwise
    written = _write_run(store, load_config("demo", [*SMALL, "ibot.separate_head=true",
                                                     "dino.head_n_prototypes=40"]))
    cfg = prepare_config(_cfg(store, "model.arch=vit_small"))
    teacher = load_teacher(cfg)
    assert teacher.model.arch == "vit_tiny" and teacher.source.endswith("export/backbone.pth")
    x = torch.randn(2, 3, 42, 42)
    net = teacher.network
    assert torch.equal(net.backbone.forward_features(x)["x_norm_clstoken"],
                       written.backbone.eval().forward_features(x)["x_norm_clstoken"])
    assert net.dino_head.out_dim == 40 and net.ibot_head.out_dim == 24
    student = build_student(cfg, net)  # prototypes follow the teacher, widths the config
    assert student.dino_head.out_dim == 40 and student.ibot_head.out_dim == 24
    assert student.backbone.embed_dim == 64


def test_a_backbone_without_heads_is_refused_with_a_clear_message(tmp_path):
    store = tmp_path.as_uri()
    _write_run(store, _cfg(store), heads=False)
    with pytest.raises(DistillSetupError, match="no heads.pth"):
        load_teacher(prepare_config(_cfg(store)))
    official = storage.join(store, "dinov2_vits14_pretrain.pth")
    export_backbone(build_network(_cfg(store)).backbone, official)
    with pytest.raises(DistillSetupError, match="without DINO/iBOT heads") as info:
        load_teacher(prepare_config(_cfg(store, f"distill.teacher={official}")))
    assert "\n" not in str(info.value)


def test_a_missing_teacher_names_the_uri(tmp_path):
    with pytest.raises(DistillSetupError, match="runs/nothing"):
        load_teacher(prepare_config(_cfg(tmp_path.as_uri(), f"distill.teacher={tmp_path.as_uri()}/runs/nothing")))


def test_head_shapes_are_read_from_the_weights():
    from app.models.heads import DINOHead

    for nlayers in (1, 2, 3):
        head = DINOHead(20, 30, nlayers=nlayers, hidden_dim=12, bottleneck_dim=6)
        rebuilt = head_from_state_dict(head.state_dict(), "test")
        x = torch.randn(5, 20)
        assert torch.equal(rebuilt(x), head(x))


def test_exported_config_describes_the_student(tmp_path):
    cfg = prepare_config(_cfg(tmp_path.as_uri()))
    out = yaml.safe_load(dump_yaml(exported_config(cfg)))
    assert out["model"]["embed_dim"] == 64 and out["model"]["depth"] == 2
    assert out["distill"]["enabled"] and out["distill"]["teacher_arch"] == "vit_tiny"
    assert cfg.model.embed_dim == 0  # the running config is untouched


def test_student_ema_momentum_is_constant_in_the_schedules(tmp_path):
    from app.ssl.schedules import Schedules

    cfg = prepare_config(_cfg(tmp_path.as_uri(), "distill.max_steps=10", "distill.student_ema=constant",
                              "distill.student_ema_momentum=0.9"))
    s = student_ema_schedules(Schedules.from_config(cfg), cfg.distill)
    assert [s.at(i).momentum for i in (0, 5, 9)] == [0.9, 0.9, 0.9]
    assert s.at(0).lr != s.at(5).lr  # everything else is the pretraining schedule


def test_cli_builds_the_stage_command_and_fails_fast(tmp_path):
    parser = argparse.ArgumentParser()
    distill_commands.register(parser.add_subparsers())
    args = parser.parse_args(["distill", "--config", "demo", "--teacher", "s3://b/runs/t",
                              "--set", "run.name=x", "--nproc", "2", "--resume", "auto"])
    cmd = distill_commands.torchrun_command(args)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[cmd.index("app.entry") + 1:] == ["distill", "--config", "demo", "--set", "run.name=x",
                                                "--set", "distill.teacher=s3://b/runs/t",
                                                "--resume", "auto"]
    from app.errors import UserError

    bad = parser.parse_args(["distill", "--config", "demo", "--set", "distill.teacher=",
                             "--set", f"run.store={tmp_path.as_uri()}"])
    with pytest.raises(UserError, match="distill.teacher"):
        bad.func(bad)


def test_the_student_ema_follows_the_momentum_schedule_by_default(tmp_path):
    """As in the reference's distillation configs: the student EMA moves with the cosine
    momentum schedule (0.994 -> 1 in the ViT-S/14 preset), not a constant."""
    from app.ssl.schedules import Schedules

    from app.config import DistillConfig

    assert DistillConfig().student_ema == "schedule"  # the default, whatever a preset says
    preset = load_config("distill_vits14_from_vitg14")
    assert preset.distill.student_ema == "schedule" and preset.teacher.momentum_teacher == 0.994
    cfg = prepare_config(_cfg(tmp_path.as_uri(), "distill.max_steps=20", "distill.student_ema=schedule",
                              "teacher.momentum_teacher=0.994"))
    s = student_ema_schedules(Schedules.from_config(cfg), cfg.distill)
    m = [s.at(i).momentum for i in range(20)]
    assert m[0] == pytest.approx(0.994) and m[-1] > 0.9999
    assert all(a <= b for a, b in zip(m, m[1:]))
    assert load_config("demo", ["distill.teacher=x"]).distill.student_ema == "constant"  # short run
