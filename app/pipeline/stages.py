"""The stage registry of the embedded pipeline: what each stage runs, needs and leaves behind.

A stage is done when its output marker exists in the store (every stage writes its marker last,
atomically), so a rerun skips it. Outputs are passed downstream as storage URIs through `--set`
overrides of the next stage's resolved config.

Markers (where each stage's own code writes them):
    curate    <store>/curation/<run.name>/selection/_SUCCESS   (app/curation; dataset <store>/datasets/<curation.name>)
    pretrain  <store>/runs/<run.name>/export/_SUCCESS          (app/train; summary.json beside it)
    distill   <store>/runs/<run.name>-distill/export/_SUCCESS  (app/train, distillation mode)
    eval      <store>/runs/<run.name>/eval/_SUCCESS            (app/eval/run.py; summary.json beside it)
    register  <store>/runs/<run.name>/register/_SUCCESS        (app/eval/registry_run.py; summary.json)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from app import storage
from app.config import Config

SYNTH_DATASET = "synth"  # <store>/datasets/synth/{pool,seeds,eval_train,eval_val}


def store_uri(cfg: Config, *parts: str) -> str:
    return storage.join(storage.to_uri(cfg.run.store), *parts)


def synth_uri(cfg: Config) -> str:
    return store_uri(cfg, "datasets", SYNTH_DATASET)


def synth_marker(cfg: Config) -> str:
    # synthesize() writes ground_truth.json after all four splits: the set is complete.
    return storage.join(synth_uri(cfg), "ground_truth.json")


def _dig(summary: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(summary, dict) or part not in summary:
            return None
        summary = summary[part]
    return summary


@dataclass(frozen=True)
class Stage:
    name: str  # the pipeline stage name (config.pipeline.stages)
    entry: str  # the entry stage: torchrun -m <entry_module> <entry> <entry_args> --config <yaml>
    marker: Callable[[Config], str]  # the output marker URI; exists = stage done
    needs: tuple[str, ...] = ()  # upstream stages whose outputs this one reads (if in the pipeline)
    entry_args: tuple[str, ...] = ()
    entry_module: str = "app.entry"
    requires: tuple[str, ...] = ()  # modules beyond app.entry.STAGES[entry] that must exist
    summary: Callable[[Config], str] | None = None  # summary JSON URI (default: the marker)
    metrics: tuple[str, ...] = ()  # dotted keys into the summary; the first present is reported
    # extra `--set` overrides given the config and the URIs of upstream outputs (by stage name)
    inputs: Callable[[Config, dict[str, str]], list[str]] = field(default=lambda cfg, up: [])
    output: Callable[[Config], str] | None = None  # the URI passed downstream (default: marker dir)
    also_show: tuple[str, ...] = ()  # further summary values printed beside the key metric

    def modules(self) -> tuple[str, ...]:
        if self.entry_module == "app.entry":
            from app.entry import STAGES

            base = (STAGES[self.entry],) if self.entry in STAGES else ("app.entry.<missing>",)
        else:
            base = (self.entry_module,)
        return base + self.requires

    def missing_module(self) -> str | None:
        """The first module this stage needs that is not importable (not built yet), or None."""
        for name in self.modules():
            try:
                if importlib.util.find_spec(name) is None:
                    return name
            except ModuleNotFoundError:  # the parent package does not exist either
                return name
        return None

    def output_uri(self, cfg: Config) -> str:
        if self.output is not None:
            return self.output(cfg)
        return self.marker(cfg).rsplit("/", 1)[0]

    def key_metric(self, cfg: Config) -> tuple[str, Any] | None:
        uri = (self.summary or self.marker)(cfg)
        try:
            data = storage.get_json(uri)
        except storage.StorageError:
            return None
        for key in self.metrics:
            value = _dig(data, key)
            if value is not None:
                return key, value
        return None

    def extra_metrics(self, cfg: Config) -> list[tuple[str, Any]]:
        if not self.also_show:
            return []
        try:
            data = storage.get_json((self.summary or self.marker)(cfg))
        except storage.StorageError:
            return []
        return [(k, v) for k in self.also_show if (v := _dig(data, k)) is not None]


# ------------------------------------------------------------------------------------------------
# Inputs: how each stage finds what upstream stages (or the synthetic data set) produced.
# ------------------------------------------------------------------------------------------------


def _curate_inputs(cfg: Config, up: dict[str, str]) -> list[str]:
    out = []
    if "synth" in up:
        if not cfg.curation.pool:
            out.append(f"curation.pool={storage.join(up['synth'], 'pool')}")
        if not cfg.curation.seeds:
            out.append(f"curation.seeds=[{storage.join(up['synth'], 'seeds')}]")
        if not cfg.curation.eval_sets:
            out.append(f"curation.eval_sets=[{storage.join(up['synth'], 'eval_val')}]")
    return out


def _pretrain_inputs(cfg: Config, up: dict[str, str]) -> list[str]:
    if "curate" in up:
        return [f"train.dataset={store_uri(cfg, 'datasets', cfg.curation.name)}"]
    if "synth" in up and not cfg.train.dataset:
        return [f"train.dataset={storage.join(up['synth'], 'pool')}"]
    return []


def distill_run_name(cfg: Config) -> str:
    return f"{cfg.run.name}-distill"


def _distill_inputs(cfg: Config, up: dict[str, str]) -> list[str]:
    out = ["distill.enabled=true", f"run.name={distill_run_name(cfg)}"]
    if "pretrain" in up:
        out.append(f"distill.teacher={store_uri(cfg, 'runs', cfg.run.name)}")
    return out + _pretrain_inputs(cfg, up)


def _eval_inputs(cfg: Config, up: dict[str, str]) -> list[str]:
    out = []
    model = up.get("distill") or up.get("pretrain")
    if model:
        out.append(f"eval.model={storage.join(model, 'backbone.pth')}")
    if "synth" in up:
        if not cfg.eval.train:
            out.append(f"eval.train={storage.join(up['synth'], 'eval_train')}")
        if not cfg.eval.val:
            out.append(f"eval.val={storage.join(up['synth'], 'eval_val')}")
    return out


REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("curate", "curate", entry_args=("run",),
          marker=lambda c: store_uri(c, "curation", c.run.name, "selection", "_SUCCESS"),
          output=lambda c: store_uri(c, "datasets", c.curation.name),
          metrics=("n_samples",), inputs=_curate_inputs),
    Stage("pretrain", "pretrain", needs=("curate",),
          marker=lambda c: store_uri(c, "runs", c.run.name, "export", "_SUCCESS"),
          summary=lambda c: store_uri(c, "runs", c.run.name, "export", "summary.json"),
          metrics=("final_losses.total_loss", "final_losses.loss", "images_per_s"),
          inputs=_pretrain_inputs),
    # Distillation runs in app/train too; it counts as built once app/train/distill.py exists.
    Stage("distill", "distill", needs=("pretrain",), requires=("app.train.distill",),
          marker=lambda c: store_uri(c, "runs", distill_run_name(c), "export", "_SUCCESS"),
          summary=lambda c: store_uri(c, "runs", distill_run_name(c), "export", "summary.json"),
          metrics=("final_losses.total_loss", "final_losses.loss"), inputs=_distill_inputs),
    # Evaluates the distilled student when distillation ran, else the pretrained teacher.
    Stage("eval", "eval", needs=("pretrain",),
          marker=lambda c: store_uri(c, "runs", c.run.name, "eval", "_SUCCESS"),
          summary=lambda c: store_uri(c, "runs", c.run.name, "eval", "summary.json"),
          metrics=("knn.top1.20",), also_show=("linear.top1",), inputs=_eval_inputs),
    Stage("register", "register", needs=("eval",),
          marker=lambda c: store_uri(c, "runs", c.run.name, "register", "_SUCCESS"),
          summary=lambda c: store_uri(c, "runs", c.run.name, "register", "summary.json"),
          metrics=("version",)),
)}
