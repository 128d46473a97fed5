"""Pretraining engine end to end: 2 processes on CPU (torchrun + gloo + DeepSpeed), a tiny ViT on
the synthetic data set, real storage, real checkpoints.

Each run is `torchrun -m app.entry pretrain --config configs/demo.yaml --set ...` with 42 px
global crops (3x3 patches, so iBOT masks exist), 14 px local crops and 4 steps. A job killed
(SIGKILL) or stopped (SIGTERM) and resumed: tests/integration/test_faults_signals.py.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> Path:
    from app.data.synth import synthesize

    root = tmp_path_factory.mktemp("store")
    synthesize(root.as_uri() + "/datasets/synth", seed=0, n_pool=48, n_seeds=4, n_eval_train=4,
               n_eval_val=4, image_size=48, n_corrupt=0, max_samples_per_shard=16)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(store: Path, run: str, stage: int, *extra: str, nproc: int = 2) -> list[str]:
    sets = {
        "run.name": run, "run.store": store.as_uri(),
        "train.dataset": store.as_uri() + "/datasets/synth/pool",
        "model.drop_path_rate": 0.1,  # exercises the RNG state saved in checkpoints
        "crops.global_crops_size": 42, "crops.local_crops_size": 14, "crops.local_crops_number": 2,
        "model.img_size": 42,
        "dino.head_n_prototypes": 64, "dino.head_hidden_dim": 32, "dino.head_bottleneck_dim": 16,
        "ibot.head_n_prototypes": 64,
        "train.batch_size_per_gpu": 4, "train.num_workers": 1, "train.max_steps": STEPS,
        "train.checkpoint_every": 2, "train.log_every": 1, "train.zero_stage": stage,
        "optim.freeze_last_layer_epochs": 1,
    }
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "app.entry", "pretrain",
            "--config", "demo"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def _env(tmp: Path, run: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DINOCTL_STAGING=str(tmp / "staging"),
               DINOCTL_HOME=str(embedded_mlflow_home(tmp / "home")), DINOCTL_SAMPLE_LOG=str(tmp / f"samples-{run}"),
               PYTHONPATH=str(REPO))
    return env


def _train(store: Path, tmp: Path, run: str, stage: int, *extra: str, nproc: int = 2,
           expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(store, run, stage, *extra, nproc=nproc), cwd=REPO, env=_env(tmp, run),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _samples(tmp: Path, run: str, rank: int) -> list[dict]:
    path = tmp / f"samples-{run}.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _export(store: Path, run: str) -> dict[str, torch.Tensor]:
    out = store / "runs" / run / "export"
    assert (out / "_SUCCESS").exists()
    sd = {f"backbone.{k}": v for k, v in torch.load(out / "backbone.pth").items()}
    for head, hsd in torch.load(out / "heads.pth").items():
        sd.update({f"{head}.{k}": v for k, v in hsd.items()})
    return sd


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(synth_store, tmp_path_factory) -> dict:
    """One 4-step run per ZeRO stage, checkpointing every 2 steps."""
    tmp = tmp_path_factory.mktemp("runs")
    runs = {}
    for stage in (1, 2, 3):
        run = f"full-z{stage}"
        _train(synth_store, tmp, run, stage)
        runs[stage] = {"run": run, "tmp": tmp, "export": _export(synth_store, run),
                       "samples": [_samples(tmp, run, r) for r in (0, 1)]}
    return runs


def test_teacher_is_identical_across_zero_stages_1_2_3(uninterrupted):
    ref = uninterrupted[1]["export"]
    for stage in (2, 3):
        assert _max_diff(ref, uninterrupted[stage]["export"]) < 1e-5, f"ZeRO-{stage} teacher differs"
    losses = {s: [row["losses"]["total_loss"] for row in uninterrupted[s]["samples"][0]] for s in (1, 2, 3)}
    assert len(losses[1]) == STEPS
    for stage in (2, 3):
        assert losses[stage] == pytest.approx(losses[1], abs=1e-5)
    # the recipe's per-module clipping ran in the job (its norms logged), the same on every stage
    norms = {s: [row["losses"][f"grad_norm_{m}"] for row in uninterrupted[s]["samples"][0]
                 for m in ("backbone", "dino_head")] for s in (1, 2, 3)}  # one head, shared with iBOT
    assert len(norms[1]) == 2 * STEPS and all(v > 0 for v in norms[1])
    assert "grad_norm_ibot_head" not in uninterrupted[1]["samples"][0][0]["losses"]
    for stage in (2, 3):
        assert norms[stage] == pytest.approx(norms[1], rel=1e-4)


def test_training_moves_the_teacher_and_writes_checkpoints_and_export(uninterrupted, synth_store):
    from app.train.checkpoint import list_tags, read_latest

    run = uninterrupted[2]["run"]
    assert read_latest(synth_store.as_uri(), run) == "step-00000004"
    assert list_tags(synth_store.as_uri(), run) == ["step-00000002", "step-00000004"]
    summary = json.loads((synth_store / "runs" / run / "export" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_losses"]["total_loss"] > 0
    # the optimizer groups the job made: the recipe's (tokens decayed), saved for resumes to check
    from app.config import load_config
    from app.ssl.meta_arch import build_network
    from app.ssl.param_groups import get_params_groups, group_layout

    cmd = _cmd(synth_store, run, 2)
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    cfg = load_config("demo", sets)
    want = group_layout(get_params_groups(build_network(cfg), cfg.optim.layerwise_decay,
                                          cfg.optim.patch_embed_lr_mult, decay_tokens=True))
    state = json.loads((synth_store / "runs" / run / "checkpoints" / "step-00000004" /
                        "train_state.json").read_text())
    assert state["param_groups"] == want
    # ranks see disjoint samples, and every step has a full batch
    keys0 = [k for row in uninterrupted[2]["samples"][0] for k in row["keys"]]
    keys1 = [k for row in uninterrupted[2]["samples"][1] for k in row["keys"]]
    assert len(keys0) == len(keys1) == STEPS * 4
    assert not set(keys0) & set(keys1)


def test_metrics_and_resolved_config_go_to_mlflow(uninterrupted):
    from mlflow.tracking import MlflowClient

    home = uninterrupted[2]["tmp"] / "home"
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == "full-z2-pretrain"]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.zero_stage"] == "2"
    for name in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss",
                 "koleo_loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s",
                 "step_time_s", "data_wait_fraction", "peak_memory_mb"):
        # (step 0 may hold the end-of-run summary's value of the same name)
        history = [m for m in client.get_metric_history(run.info.run_id, name) if m.step > 0]
        assert [m.step for m in history] == list(range(1, STEPS + 1)), name
    # system metrics for MLflow's System metrics tab (a reading at the start, then every 10 s)
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                 "system/system_memory_usage_percentage", "system/disk_usage_percentage"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert 0 < run.data.metrics["system/system_memory_usage_megabytes"]
    # the experiment opens on MLflow's model-training view, not the GenAI one
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize("stage", [3])  # ZeRO-2: every fault test resumes it; ZeRO-1 shares its optimizer code
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(uninterrupted, synth_store, stage):
    """Start a new run from the step-2 checkpoint of the uninterrupted one: same steps 2-3."""
    full = uninterrupted[stage]
    tmp = full["tmp"]
    ckpt = f"{synth_store.as_uri()}/runs/{full['run']}/checkpoints/step-00000002"
    run = f"resumed-z{stage}"
    _train(synth_store, tmp, run, stage, "--resume", ckpt)
    assert _max_diff(full["export"], _export(synth_store, run)) <= 1e-6
    for rank in (0, 1):
        resumed = _samples(tmp, run, rank)
        assert [r["step"] for r in resumed] == [2, 3]
        for got, want in zip(resumed, full["samples"][rank][2:]):
            assert got["keys"] == want["keys"]
            assert got["losses"]["total_loss"] == pytest.approx(want["losses"]["total_loss"], abs=1e-6)


def test_nan_loss_stops_with_a_message_naming_step_and_term(synth_store, tmp_path):
    run = "nan"
    proc = _train(synth_store, tmp_path, run, 2, "--set", "optim.base_lr=1e30",
                  "--set", "optim.warmup_epochs=0", "--set", "optim.freeze_last_layer_epochs=0",
                  "--set", "train.checkpoint_every=1", nproc=1, expect=1)
    text = proc.stdout + proc.stderr
    assert "non-finite loss at step" in text
    line = next(l for l in text.splitlines() if "non-finite loss at step" in l)
    assert "_loss=" in line
    step = int(line.split("non-finite loss at step ")[1].split(":")[0])
    from app.train.checkpoint import read_latest

    latest = read_latest(synth_store.as_uri(), run)
    # only finite states were checkpointed: the last checkpoint is the step before the NaN
    assert latest == (f"step-{step:08d}" if step > 0 else None)
    assert not (synth_store / "runs" / run / "export").exists()
