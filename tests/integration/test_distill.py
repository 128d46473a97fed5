"""Distillation end to end: 2 processes on CPU (torchrun + gloo + DeepSpeed ZeRO-3), a frozen
tiny teacher run (random weights, exported the way pretraining exports), a smaller student, real
storage, real checkpoints.

Each run is `torchrun -m app.entry distill --config configs/demo.yaml --set ...` with 42 px global
crops (3x3 patches), 14 px local crops and 4 steps, checkpointing every 2.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.services import embedded_mlflow_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
SETS = {
    "crops.global_crops_size": 42, "crops.local_crops_size": 14, "crops.local_crops_number": 2,
    "model.img_size": 42, "model.drop_path_rate": 0.0,
    "dino.head_n_prototypes": 64, "dino.head_hidden_dim": 32, "dino.head_bottleneck_dim": 16,
    "ibot.separate_head": "true", "ibot.head_n_prototypes": 48, "ibot.head_hidden_dim": 32,
    "ibot.head_bottleneck_dim": 16,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A tiny synthetic data set and a teacher run with export/{backbone,heads}.pth + config.yaml."""
    from app import storage
    from app.config import dump_yaml, load_config
    from app.data.synth import synthesize
    from app.models.convert import export_backbone
    from app.ssl.meta_arch import build_network

    root = tmp_path_factory.mktemp("store")
    synthesize(root.as_uri() + "/datasets/synth", seed=0, n_pool=48, n_seeds=4, n_eval_train=4,
               n_eval_val=4, image_size=48, n_corrupt=0, max_samples_per_shard=16)
    cfg = load_config("demo", [f"{k}={v}" for k, v in SETS.items()])
    torch.manual_seed(7)
    teacher = build_network(cfg)
    out = root.as_uri() + "/runs/teacher/export"
    export_backbone(teacher.backbone, out + "/backbone.pth")
    buf = io.BytesIO()
    torch.save({"dino_head": teacher.dino_head.state_dict(), "ibot_head": teacher.ibot_head.state_dict()}, buf)
    storage.put_bytes(out + "/heads.pth", buf.getvalue())
    storage.put_bytes(out + "/config.yaml", dump_yaml(cfg).encode())
    storage.put_bytes(out + "/_SUCCESS", b"")
    return root


def _distill(store: Path, tmp: Path, run: str, *extra: str, stage: int = 3) -> subprocess.CompletedProcess:
    sets = {**SETS, "run.name": run, "run.store": store.as_uri(),
            "train.dataset": store.as_uri() + "/datasets/synth/pool",
            "distill.teacher": store.as_uri() + "/runs/teacher",
            "student.img_size": 42, "student.embed_dim": 64, "student.depth": 2,
            "distill.student_ema_momentum": 0.5, "distill.max_steps": STEPS,
            "train.batch_size_per_gpu": 4, "train.num_workers": 1, "train.checkpoint_every": 2,
            "train.log_every": 1, "train.zero_stage": stage, "optim.freeze_last_layer_epochs": 0}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "app.entry", "distill", "--config", "demo"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DINOCTL_STAGING=str(tmp / "staging"),
               DINOCTL_HOME=str(embedded_mlflow_home(tmp / "home")), DINOCTL_SAMPLE_LOG=str(tmp / f"samples-{run}"),
               PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _export(store: Path, run: str) -> dict[str, torch.Tensor]:
    out = store / "runs" / run / "export"
    sd = {f"backbone.{k}": v for k, v in torch.load(out / "backbone.pth").items()}
    for head, hsd in torch.load(out / "heads.pth").items():
        sd.update({f"{head}.{k}": v for k, v in hsd.items()})
    return sd


@pytest.fixture(scope="module")
def distilled(store, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("runs")
    _distill(store, tmp, "student")
    return {"run": "student", "tmp": tmp}


def test_export_holds_the_student_ema_loadable_strictly_as_the_student_architecture(distilled, store):
    from app.eval.model_ref import resolve_model

    out = store / "runs" / "student" / "export"
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "backbone.pth", "config.yaml",
                                                     "heads.pth", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_losses"]["total_loss"] > 0
    assert summary["teacher"]["embed_dim"] == 192 and summary["student"]["embed_dim"] == 64
    ref = resolve_model((store / "runs" / "student").as_uri())  # strict load, arch from the weights
    assert ref.model.embed_dim == 64 and ref.model.depth == 2
    heads = torch.load(out / "heads.pth")
    assert heads["dino_head"]["last_layer.weight_v"].shape[0] == 64  # the teacher's prototypes
    assert heads["ibot_head"]["last_layer.weight_v"].shape[0] == 48
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["embed_dim"] == 64 and config["distill"]["teacher_arch"] == "vit_tiny"


def test_checkpoints_hold_the_student_ema_which_differs_from_the_student(distilled, store):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpts = store / "runs" / "student" / "checkpoints"
    assert (ckpts / "LATEST").read_text() == "step-00000004"
    meta = torch.load(ckpts / "step-00000004" / "teacher.pt")
    assert not any(k.startswith("teacher.") for k in meta)  # the frozen teacher is not re-saved
    ema = {k[len("student_ema."):]: v for k, v in meta.items() if k.startswith("student_ema.")}
    student = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step-00000004")
    assert ema.keys() == student.keys()
    assert max((ema[k] - student[k]).abs().max().item() for k in ema) > 1e-4
    exported = _export(store, "student")
    assert all(torch.equal(exported[k], ema[k]) for k in exported)  # the export is the EMA


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(distilled, store):
    tmp = distilled["tmp"]
    ckpt = (store / "runs" / "student" / "checkpoints" / "step-00000002").as_uri()
    _distill(store, tmp, "resumed", "--resume", ckpt)
    full, resumed = _export(store, "student"), _export(store, "resumed")
    assert full.keys() == resumed.keys()
    assert max((full[k].double() - resumed[k].double()).abs().max().item() for k in full) <= 1e-6
    rows = [json.loads(l) for l in (tmp / "samples-resumed.rank0.jsonl").read_text().splitlines()]
    want = [json.loads(l) for l in (tmp / "samples-student.rank0.jsonl").read_text().splitlines()][2:]
    assert [r["step"] for r in rows] == [2, 3]
    for got, exp in zip(rows, want):
        assert got["keys"] == exp["keys"]
        assert got["losses"]["total_loss"] == pytest.approx(exp["losses"]["total_loss"], abs=1e-6)


def test_metrics_go_to_mlflow_under_the_distill_stage(distilled):
    from mlflow.tracking import MlflowClient

    home = distilled["tmp"] / "home"
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == "student-distill"]
    assert len(runs) == 1
    for name in ("total_loss", "ibot_loss", "koleo_loss", "momentum", "teacher_temp"):
        history = client.get_metric_history(runs[0].info.run_id, name)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), name
    assert client.get_metric_history(runs[0].info.run_id, "momentum")[0].value == 0.5
