"""Pure helpers that shape what goes to MLflow: secret filtering, limits, flattening."""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

# MLflow limits (mlflow.utils.validation, 3.x): values are cut, batches split to fit.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

# Words that make a key secret on their own, and key words that are secret after a qualifier
# ("api_key", "secretAccessKey"); a bare "key" or "k" (dedup.k, sort_key) is not secret.
_SECRET_WORDS = frozenset({"secret", "secrets", "password", "passwd", "pwd", "passphrase", "token",
                           "credential", "credentials", "apikey", "authorization", "cookie"})
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "session", "signing",
                             "encryption", "auth", "client", "account"})
_KEY_WORDS = frozenset({"key", "token"})
_MODEL_TOKENS = frozenset({"cls", "mask", "register", "pad", "eos", "bos", "special", "class"})


def key_words(key: str) -> list[str]:
    """`'s3.secretAccessKey'` -> `['s3', 'secret', 'access', 'key']`."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    words = key_words(key)
    for i, w in enumerate(words):
        if w == "token" and i > 0 and words[i - 1] in _MODEL_TOKENS:
            continue  # cls_token, mask_token: model parts, not credentials
        if w in _SECRET_WORDS:
            return True
    return any(a in _KEY_QUALIFIERS and b in _KEY_WORDS for a, b in zip(words, words[1:]))


def flatten_dict(data: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (the config tree's own flattening)."""
    from app.config import flatten

    return flatten(data, prefix)


def clean_key(key: str) -> str:
    """MLflow keys allow letters, digits, `_ - . / space`; anything else becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(key))[:MAX_KEY]


def param_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Non-secret params as `(key, value)` strings within MLflow's limits, sorted by key."""
    items = []
    for key, value in params.items():
        if is_secret_key(str(key)):
            continue
        text = "" if value is None else str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        items.append((clean_key(key), text))
    return sorted(items)


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def to_number(value: Any) -> float | None:
    """A float for int/float/0-d tensor/numpy scalars; None for anything else (bools too)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            number = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        return None if isinstance(number, bool) else float(number)
    return None


def numeric_leaves(summary: dict, prefix: str = "") -> dict[str, float]:
    """Finite numeric leaves of a nested summary, keys joined with '.'; lists are skipped."""
    out: dict[str, float] = {}
    for key, value in flatten_dict(summary, prefix).items():
        number = to_number(value)
        if number is not None and math.isfinite(number):
            out[clean_key(key)] = number
    return out
