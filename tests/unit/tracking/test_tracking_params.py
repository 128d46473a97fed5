"""What reaches MLflow: no secret-looking keys, values within limits, numeric summary leaves."""

import numpy as np
import pytest
import torch

from app.tracking import params as P


@pytest.mark.parametrize("key", [
    "s3.secret_key", "AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "db.password", "hf_token",
    "mlflow.tracking_token", "api_key", "apiKey", "s3.secretAccessKey", "credentials.file",
    "private_key_path", "auth.token", "passwd",
])
def test_secret_looking_keys_are_recognised(key):
    assert P.is_secret_key(key)


@pytest.mark.parametrize("key", [
    "curation.dedup.k", "retrieve.k", "sort_key", "model.num_register_tokens", "cls_token",
    "mask_token", "train.batch_size_per_gpu", "eval.knn_k", "keep_checkpoints", "monkey",
    "tokenizer", "max_tokens",
])
def test_ordinary_keys_are_kept(key):
    assert not P.is_secret_key(key)


def test_param_items_drop_secrets_truncate_values_and_clean_keys():
    items = dict(P.param_items({"a.secret": "x", "long": "v" * 7000, "b c(d)": 1, "none": None}))
    assert "a.secret" not in items
    assert len(items["long"]) == P.MAX_PARAM_VALUE and items["long"].endswith("...")
    assert items["b c_d_"] == "1" and items["none"] == ""


def test_chunks_split_into_batches_of_100():
    sizes = [len(c) for c in P.chunks(list(range(250)), P.PARAMS_PER_BATCH)]
    assert sizes == [100, 100, 50]


def test_numeric_leaves_take_numbers_tensors_and_numpy_but_not_bools_lists_or_nan():
    summary = {"knn": {"top1": 0.5, "k": [10, 20]}, "n": 3, "ok": True, "t": torch.tensor(2.0),
               "np": np.float32(1.5), "bad": float("nan"), "name": "x", "vec": torch.ones(2)}
    assert P.numeric_leaves(summary) == {"knn.top1": 0.5, "n": 3.0, "t": 2.0, "np": 1.5}
