"""The real pretraining stage as an executor test case: a tiny ViT on a tiny synthetic set.

`pretrain_spec` is a 2-replica x 1-process JobSpec of `torchrun -m app.entry pretrain` that
checkpoints every 2 of 6 steps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from app.launch.jobspec import JobSpec

STEPS = 6


def pretraining_available() -> bool:
    return importlib.util.find_spec("app.train.run") is not None


def synth_tiny(store: Path) -> str:
    from app.data.synth import synthesize

    uri = store.as_uri() + "/datasets/synth"
    synthesize(uri, seed=0, n_pool=48, n_seeds=4, n_eval_train=4, n_eval_val=4, image_size=48,
               n_corrupt=0, max_samples_per_shard=16)
    return uri + "/pool"


def pretrain_spec(name: str, store: Path, dataset: str, staging: Path, **kw) -> JobSpec:
    sets = {
        "run.name": name, "run.store": store.as_uri(), "train.dataset": dataset,
        "crops.global_crops_size": 42, "crops.local_crops_size": 14, "crops.local_crops_number": 2,
        "model.img_size": 42, "model.drop_path_rate": 0.0,
        "dino.head_n_prototypes": 64, "dino.head_hidden_dim": 32, "dino.head_bottleneck_dim": 16,
        "ibot.head_n_prototypes": 64,
        "train.batch_size_per_gpu": 4, "train.num_workers": 1, "train.max_steps": STEPS,
        "train.checkpoint_every": 2, "train.log_every": 1, "train.zero_stage": 2,
        "optim.freeze_last_layer_epochs": 1,
    }
    args = ["--config", "demo"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    kw.setdefault("replicas", 2)
    return JobSpec(name=name, stage="pretrain", args=tuple(args), restart_policy="OnFailure",
                   backoff_limit=2, env=(("DINOCTL_STAGING", str(staging)),), **kw)


def latest_path(store: Path, name: str) -> Path:
    return store / "runs" / name / "checkpoints" / "LATEST"


def export_success(store: Path, name: str) -> Path:
    return store / "runs" / name / "export" / "_SUCCESS"
