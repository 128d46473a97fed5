"""Register a backbone as an MLflow model version and keep the `champion` alias honest.

    result = register_backbone(tracker, ref, eval_summary)      # inside tracker.start("register")
    mlflow.pytorch.load_model("models:/dinov2-vit_small@champion")(images)  # == backbone(images)

Each version is logged with the PyTorch flavour (the module pickled, a tensor signature
`[-1, 3, H, W] -> [-1, D]` and an input example), named `dinov2-<arch>`, and gets the alias
`candidate`. Its evaluation is stored as version tags (`eval_set`, `knn_top1_k20`, ...).
`champion` moves to it only when its k-NN top-1 at k=20 beats the current champion's on the
same evaluation set (equal `eval_set` ids); otherwise the reason is returned and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
METRIC_TAG = "knn_top1_k20"
EVAL_SET_TAG = "eval_set"
MODEL_ARTIFACT = "model"


def registered_name(arch: str) -> str:
    return f"dinov2-{arch}"


@dataclass
class Registration:
    name: str
    version: str
    aliases: list[str]
    champion_moved: bool
    reason: str
    previous_champion: str | None
    tags: dict[str, str] = field(default_factory=dict)
    model_uri: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def eval_tags(summary: dict[str, Any] | None) -> dict[str, str]:
    """Version tags from an eval summary (empty without one)."""
    if not summary:
        return {}
    tags = {EVAL_SET_TAG: str(summary["eval_set"]["id"])}
    top1 = summary.get("knn", {}).get("top1", {})
    for k, v in top1.items():
        tags[f"knn_top1_k{k}"] = f"{float(v):.4f}"
    if "linear" in summary:
        tags["linear_top1"] = f"{float(summary['linear']['top1']):.4f}"
    tags["eval_train"] = str(summary["eval_set"].get("train", ""))
    tags["eval_val"] = str(summary["eval_set"].get("val", ""))
    return tags


def champion_decision(candidate: dict[str, str], champion: dict[str, str] | None,
                      champion_version: str | None) -> tuple[bool, str]:
    """(move champion?, why) from the candidate's and the champion's version tags."""
    if METRIC_TAG not in candidate or EVAL_SET_TAG not in candidate:
        return False, f"candidate has no evaluation ({METRIC_TAG} tag); champion unchanged"
    new = float(candidate[METRIC_TAG])
    if champion is None:
        return True, f"no champion yet; {METRIC_TAG}={new:.2f}"
    if METRIC_TAG not in champion or EVAL_SET_TAG not in champion:
        return True, f"champion v{champion_version} has no evaluation; {METRIC_TAG}={new:.2f}"
    if champion[EVAL_SET_TAG] != candidate[EVAL_SET_TAG]:
        return False, (f"evaluation set differs (candidate {candidate[EVAL_SET_TAG]}, champion "
                       f"v{champion_version} {champion[EVAL_SET_TAG]}): not comparable; "
                       "champion unchanged")
    old = float(champion[METRIC_TAG])
    if new > old:
        return True, f"{METRIC_TAG} {new:.2f} beats champion v{champion_version} ({old:.2f})"
    return False, f"{METRIC_TAG} {new:.2f} does not beat champion v{champion_version} ({old:.2f})"


@contextlib.contextmanager
def scoped_mlflow_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at `uri` for the block only.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which
    `app.tracking` reads; both the module state and the environment are restored afterwards.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in env_names}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def registry_client(uri: str | None = None):
    """An MlflowClient whose registry is the tracking server too (never a stray env default)."""
    from mlflow.tracking import MlflowClient

    from app.tracking import tracking_uri

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def load_registered(name: str, alias: str = CHAMPION, uri: str | None = None) -> torch.nn.Module:
    """`mlflow.pytorch.load_model("models:/<name>@<alias>")` against `uri` (default: ours)."""
    import mlflow.pytorch

    from app.tracking import tracking_uri

    with scoped_mlflow_uri(uri or tracking_uri()):
        return mlflow.pytorch.load_model(f"models:/{name}@{alias}")


def _get_alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def log_pytorch_model(tracker, model: torch.nn.Module, name: str, image_size: int):
    """Log `model` under the tracker's run and register it as a version of `name`; returns ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    model = model.eval().cpu()
    example = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    torch_version = torch.__version__.split("+")[0]
    with scoped_mlflow_uri(tracker.uri), mlflow.start_run(run_id=tracker.run_id):
        return mlflow.pytorch.log_model(
            model, name=MODEL_ARTIFACT, signature=signature, input_example=example.numpy(),
            # pickle keeps the module's dynamic shapes (pt2 export would fix the batch size);
            # explicit requirements skip MLflow's slow import-tracing inference.
            serialization_format="pickle", pip_requirements=[f"torch=={torch_version}"],
            registered_model_name=name, await_registration_for=60)


def register_backbone(tracker, ref, eval_summary: dict[str, Any] | None, name: str | None = None,
                      image_size: int | None = None, extra_tags: dict[str, str] | None = None) -> Registration:
    """Log + register `ref.model` (an `app.eval.model_ref.ModelRef`), set `candidate`, and move
    `champion` only on a comparable improvement. `tracker` must be inside `start(...)`."""
    from app.eval.features import model_fingerprint

    name = name or registered_name(ref.arch)
    size = image_size or (eval_summary or {}).get("eval_set", {}).get("image_size") or ref.model.patch_size * 2
    info = log_pytorch_model(tracker, ref.model, name, int(size))
    version = str(info.registered_model_version)
    client = registry_client(tracker.uri)
    tags = {"arch": ref.arch, "model_source": ref.source, "run_uri": ref.run_uri or "",
            "model_fingerprint": model_fingerprint(ref.model)[:16], **eval_tags(eval_summary),
            **(extra_tags or {})}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    champ = _get_alias_version(client, name, CHAMPION)
    champ_tags = dict(champ.tags) if champ is not None else None
    champ_version = str(champ.version) if champ is not None else None
    move, reason = champion_decision(tags, champ_tags, champ_version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    aliases = [CANDIDATE]
    if move:
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    log.info("registered %s v%s (%s); champion %s: %s", name, version, ", ".join(aliases),
             "moved" if move else "unchanged", reason)
    tracker.set_tags({"registered_model": name, "registered_version": version,
                      "champion_moved": str(move).lower()})
    return Registration(name, version, aliases, move, reason, champ_version, tags, info.model_uri)


def list_versions(client, prefix: str = "dinov2-") -> list[dict[str, Any]]:
    """Every version of every `<prefix>*` model: name, version, aliases, eval tags, run."""
    rows = []
    for rm in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        alias_of: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            alias_of.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            tags = dict(mv.tags or {})
            rows.append({
                "name": rm.name, "version": str(mv.version),
                "aliases": sorted(alias_of.get(str(mv.version), [])),
                METRIC_TAG: tags.get(METRIC_TAG, ""), "linear_top1": tags.get("linear_top1", ""),
                EVAL_SET_TAG: tags.get(EVAL_SET_TAG, ""), "run_uri": tags.get("run_uri", ""),
                "created": int(mv.creation_timestamp or 0),
            })
    rows.sort(key=lambda r: (r["name"], int(r["version"])))
    return rows


def format_versions(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no registered dinov2-* models"
    cols = ("name", "version", "aliases", METRIC_TAG, "linear_top1", EVAL_SET_TAG, "run_uri")
    table = [[", ".join(r[c]) if c == "aliases" else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(line.rstrip() for line in lines)
