"""k-NN for several k in one search, the evaluation summary, and the champion rule."""

from __future__ import annotations

import torch

from app.eval.features import FeatureSet
from app.eval.knn import knn_predict_scores, knn_predictions
from app.eval.mlflow_model import champion_decision, eval_tags
from app.eval.protocols import EvalSettings, evaluate, headline_metrics


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int, center_seed: int = 0):
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(center_seed)) * 5
    g = torch.Generator().manual_seed(seed)
    x = centers.repeat_interleave(n_per_class, 0) + spread * torch.randn(n_per_class * num_classes, dim, generator=g)
    return x, torch.arange(num_classes).repeat_interleave(n_per_class)


def _featureset(x: torch.Tensor, y: torch.Tensor, index_sha: str) -> FeatureSet:
    return FeatureSet(x, x * 0.5, x.unsqueeze(1), y, [f"k{i}" for i in range(len(y))], [],
                      ["a", "b", "c", "d"], "file:///d", index_sha)


def test_knn_predictions_match_per_k_scores_and_cap_k_at_bank_size():
    x, y = _blobs(6, 3, 8, 4.0, 1)
    q, _ = _blobs(5, 3, 8, 4.0, 2)
    preds = knn_predictions(x, y, q, ks=(1, 5, 10, 500), temperature=0.07, num_classes=3)
    for k in (1, 5, 10):
        expected = knn_predict_scores(x, y, q, k, 0.07, 3).argmax(1)
        assert torch.equal(preds[k], expected)
    assert torch.equal(preds[500], knn_predict_scores(x, y, q, 18, 0.07, 3).argmax(1))


def test_evaluate_separable_features_score_100_and_summary_names_the_eval_set():
    xtr, ytr = _blobs(20, 4, 16, 0.2, 3)
    xva, yva = _blobs(5, 4, 16, 0.2, 4)
    s = EvalSettings(knn_k=[10, 20, 100], linear_lrs=[0.1], linear_wds=[0.0], linear_epochs=15,
                     linear_batch_size=32, image_size=28)
    res = evaluate(_featureset(xtr, ytr, "aa"), _featureset(xva, yva, "bb"), s)
    summary = res.summary
    assert summary["knn"]["top1"] == {"10": 100.0, "20": 100.0, "100": 100.0}
    assert summary["knn"]["k_used"]["100"] == 80
    assert summary["linear"]["top1"] == 100.0
    assert summary["knn"]["per_class_top1"] == {"a": 100.0, "b": 100.0, "c": 100.0, "d": 100.0}
    assert res.confusion["knn_k20"].trace() == 20 and res.confusion["linear"].sum() == 20
    assert headline_metrics(summary)["knn_top1_k20"] == 100.0
    again = evaluate(_featureset(xtr, ytr, "aa"), _featureset(xva, yva, "bb"), s).summary
    other = evaluate(_featureset(xtr, ytr, "aa"), _featureset(xva, yva, "cc"), s).summary
    assert summary["eval_set"]["id"] == again["eval_set"]["id"] != other["eval_set"]["id"]


def test_shuffled_labels_give_chance_knn_accuracy():
    xtr, ytr = _blobs(50, 4, 8, 0.3, 5)
    ytr = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(6))]
    xva, yva = _blobs(50, 4, 8, 0.3, 7)
    s = EvalSettings(knn_k=[20], linear=False)
    acc = evaluate(_featureset(xtr, ytr, "a"), _featureset(xva, yva, "b"), s).summary["knn"]["top1"]["20"]
    assert acc < 50.0  # chance is 25%


def _tags(metric: float, eval_set: str = "e1") -> dict[str, str]:
    return eval_tags({"eval_set": {"id": eval_set}, "knn": {"top1": {"20": metric}}})


def test_champion_moves_only_on_a_strict_improvement_on_the_same_eval_set():
    assert champion_decision(_tags(50.0), None, None)[0] is True
    assert champion_decision(_tags(51.0), _tags(50.0), "1")[0] is True
    assert champion_decision(_tags(50.0), _tags(50.0), "1")[0] is False
    move, why = champion_decision(_tags(40.0), _tags(50.0), "1")
    assert not move and "does not beat" in why
    move, why = champion_decision(_tags(90.0, "e2"), _tags(50.0, "e1"), "1")
    assert not move and "evaluation set differs" in why
    move, why = champion_decision({}, _tags(50.0), "1")
    assert not move and "no evaluation" in why
