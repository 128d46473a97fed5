"""The evaluation protocols on extracted features, as one summary dict.

    result = evaluate(train_feats, val_feats, EvalSettings.from_config(cfg.eval))
    result.summary      # JSON-able: k-NN top-1 per k, linear top-1, per-class accuracy
    result.confusion    # {"knn_k20": [C, C], "linear": [C, C]}

k-NN: weighted votes over the k most similar training CLS features, T = 0.07, k in
{10, 20, 100, 200} capped to the bank size. Linear probe: CLS (of the last n blocks) optionally
with the mean patch token, (lr, wd) chosen on a held-out part of train (`app/eval/linear.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from app.eval.features import FeatureSet, transform_params
from app.eval.knn import confusion_matrix, knn_predictions, per_class_accuracy
from app.eval.linear import linear_probe

PRIMARY_K = 20  # the k the registry compares (DINOv2 reports k=20)


@dataclass
class EvalSettings:
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    linear: bool = True
    linear_lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    linear_wds: list[float] = field(default_factory=lambda: [0.0, 1e-4])
    linear_epochs: int = 100
    linear_batch_size: int = 256
    linear_features: str = "cls"
    linear_n_last_blocks: int = 1
    linear_heldout_fraction: float = 0.2
    image_size: int = 224
    seed: int = 0

    @classmethod
    def from_config(cls, ecfg: Any, seed: int = 0, linear: bool = True) -> "EvalSettings":
        return cls(list(ecfg.knn_k), ecfg.knn_temperature, linear, list(ecfg.linear_lrs),
                   list(ecfg.linear_wds), ecfg.linear_epochs, ecfg.linear_batch_size,
                   ecfg.linear_features, ecfg.linear_n_last_blocks, ecfg.linear_heldout_fraction,
                   ecfg.image_size, seed)


@dataclass
class EvalResult:
    summary: dict[str, Any]
    confusion: dict[str, torch.Tensor]
    class_names: list[str]


def eval_set_id(train: FeatureSet, val: FeatureSet, image_size: int, temperature: float) -> str:
    """Identity of "the same evaluation": the data (index hashes) and the protocol settings.
    Two models are only compared when their ids are equal."""
    ident = {"train": train.index_sha256, "val": val.index_sha256,
             "transform": transform_params(image_size), "knn_temperature": temperature}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _per_class(pred: torch.Tensor, target: torch.Tensor, names: list[str]) -> dict[str, float | None]:
    accs = per_class_accuracy(pred, target, len(names))
    return {name: (None if math.isnan(a) else round(a, 4)) for name, a in zip(names, accs)}


def _class_names(train: FeatureSet, num_classes: int) -> list[str]:
    names = list(train.classes) + [""] * max(0, num_classes - len(train.classes))
    return [n or str(i) for i, n in enumerate(names[:num_classes])]


def evaluate(train: FeatureSet, val: FeatureSet, s: EvalSettings) -> EvalResult:
    """k-NN (and the linear probe) of `val` against `train`; see the module docstring."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError("evaluation needs at least one train and one val image")
    num_classes = max(len(train.classes), int(train.labels.max()) + 1, int(val.labels.max()) + 1)
    names = _class_names(train, num_classes)
    ks = sorted({int(k) for k in s.knn_k})
    preds = knn_predictions(train.cls, train.labels, val.cls, ks, s.knn_temperature, num_classes)
    target = val.labels
    top1 = {str(k): round(float((p == target).float().mean() * 100.0), 4) for k, p in preds.items()}
    primary = PRIMARY_K if PRIMARY_K in preds else ks[0]
    knn = {
        "top1": top1,
        "k_used": {str(k): min(k, len(train)) for k in ks},
        "temperature": s.knn_temperature,
        "primary_k": primary,
        "per_class_top1": _per_class(preds[primary], target, names),
    }
    confusion = {f"knn_k{primary}": confusion_matrix(preds[primary], target, num_classes)}
    summary: dict[str, Any] = {
        "eval_set": {
            "id": eval_set_id(train, val, s.image_size, s.knn_temperature),
            "train": train.dataset_uri, "val": val.dataset_uri,
            "train_index_sha256": train.index_sha256, "val_index_sha256": val.index_sha256,
            "image_size": s.image_size, "num_classes": num_classes,
        },
        "counts": {"train": len(train), "val": len(val), "train_corrupt": len(train.corrupt),
                   "val_corrupt": len(val.corrupt)},
        "classes": names,
        "knn": knn,
    }
    if s.linear:
        xtr = train.linear_input(s.linear_features, s.linear_n_last_blocks)
        xva = val.linear_input(s.linear_features, s.linear_n_last_blocks)
        res = linear_probe(xtr, train.labels, xva, val.labels, lrs=s.linear_lrs,
                           weight_decays=s.linear_wds, epochs=s.linear_epochs,
                           batch_size=s.linear_batch_size,
                           heldout_fraction=s.linear_heldout_fraction, seed=s.seed)
        logits = ((xva.float() - res.mean) / res.std) @ res.weight.T + res.bias
        lin_pred = logits.argmax(1)
        summary["linear"] = {
            "top1": round(res.top1, 4), "lr": res.lr, "weight_decay": res.weight_decay,
            "heldout_top1": round(res.heldout_top1, 4), "grid": res.grid,
            "features": s.linear_features, "n_last_blocks": s.linear_n_last_blocks,
            "epochs": s.linear_epochs, "per_class_top1": _per_class(lin_pred, target, names),
        }
        confusion["linear"] = confusion_matrix(lin_pred, target, num_classes)
    return EvalResult(summary, confusion, names)


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat metrics for MLflow: knn_top1_k<k>, linear_top1, linear_heldout_top1."""
    out = {f"knn_top1_k{k}": v for k, v in summary.get("knn", {}).get("top1", {}).items()}
    if "linear" in summary:
        out["linear_top1"] = summary["linear"]["top1"]
        out["linear_heldout_top1"] = summary["linear"]["heldout_top1"]
    counts = summary.get("counts", {})
    for key in ("train_corrupt", "val_corrupt"):
        if key in counts:
            out[f"images_{key}"] = counts[key]
    return out


def confusion_figure(cm: torch.Tensor, names: list[str], title: str):
    """A matplotlib figure (Agg) of a [C, C] confusion matrix, rows = true class."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    c = cm.shape[0]
    size = min(2.0 + 0.45 * c, 24.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    counts = cm.float()
    norm = counts / counts.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(c), names, rotation=90, fontsize=7)
    ax.set_yticks(range(c), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
