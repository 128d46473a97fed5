"""Typed configuration tree, loaded from YAML presets with `--set a.b=c` overrides.

The dataclass defaults are the official DINOv2 defaults (`ssl_default_config.yaml`); a preset in
`configs/` overrides what differs. Unknown keys and values of the wrong type are errors that name
the key and the file they came from.

Where things go: `run.store` defaults to `$DINOCTL_STORE` (set in every pod by the chart), else
`<$DINOCTL_HOME>/store` (our images set DINOCTL_HOME to a writable /tmp), else the embedded
`file://./.dinoctl/store`. Any string value may say `${run.store}` (e.g. `train.dataset:
${run.store}/datasets/curated`): it is replaced by the resolved store, so one stage config works
on a laptop and in a cluster.

Presets are found in `$DINOCTL_CONFIG_DIR`, the source tree's `configs/` and the installed copy
(`<prefix>/share/dinoctl/configs`, from the wheel); `_base_:` names a file next to the preset or
a preset by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app import DEFAULT_IMAGE

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the source tree's presets
INSTALLED_CONFIG_DIR = Path(sys.prefix) / "share" / "dinoctl" / "configs"  # the wheel's copy
EMBEDDED_STORE = "file://./.dinoctl/store"
STORE_REF = "${run.store}"


def config_dirs() -> list[Path]:
    """Where presets are looked up, in order (existing directories only)."""
    dirs = [Path(d) for d in os.environ.get("DINOCTL_CONFIG_DIR", "").split(os.pathsep) if d]
    dirs += [CONFIG_DIR, INSTALLED_CONFIG_DIR]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def default_store() -> str:
    """`$DINOCTL_STORE`, else `<$DINOCTL_HOME>/store`, else the embedded ./.dinoctl/store."""
    store = os.environ.get("DINOCTL_STORE", "").strip()
    if store:
        return store.rstrip("/")
    home = os.environ.get("DINOCTL_HOME", "").strip()
    if home:
        return Path(home).resolve().joinpath("store").as_uri()
    return EMBEDDED_STORE


class ConfigError(ValueError):
    """A one-line, user-facing configuration problem."""


# ----------------------------------------------------------------------------------------------
# The tree. Section names follow the official config where one exists.
# ----------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "dinov2"  # run name: outputs go to <store>/runs/<name>/
    store: str = ""  # root URI of the object store (file:// or s3://); empty: default_store()
    experiment: str = "dinoctl"  # MLflow experiment
    seed: int = 0


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2
    patch_size: int = 14
    img_size: int = 224  # pos-embed grid size at construction (official checkpoints: 518)
    ffn_layer: str = "mlp"  # mlp | swiglu
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layerscale: float = 1.0e-5
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    pretrained_weights: str = ""  # optional URI/path of an official or exported backbone
    embed_dim: int = 0  # >0 overrides the arch's width (heads stay 64-d: embed_dim/64); distill student  # H10
    depth: int = 0  # >0 overrides the arch's number of blocks; distill student  # H10


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class OptimConfig:
    epochs: int = 100
    base_lr: float = 0.004  # for a global batch of 1024, scaled by `scaling_rule`
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 | linear_wrt_256 | none
    warmup_epochs: int = 10
    min_lr: float = 1.0e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    # per_module: backbone, DINO head and iBOT head each clipped at clip_grad (the reference);
    # global: one norm over all of them (DeepSpeed's own clipping).
    clip_grad_mode: str = "per_module"
    decay_learned_tokens: bool = True  # weight decay on cls/pos/mask/register tokens (reference)
    freeze_last_layer_epochs: int = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 98
    # "official": the effective probabilities of the released code (global-1 0.0, global-2 0.9,
    # local 0.5; its GaussianBlur inverts p). "intended": the BYOL/DINO recipe (1.0, 0.1, 0.5).
    blur_mode: str = "official"


@dataclass
class TrainConfig:
    dataset: str = ""  # dataset URI (a directory written by `dinoctl data ...`)
    batch_size_per_gpu: int = 64
    num_workers: int = 10
    epoch_length: int = 1250  # OFFICIAL_EPOCH_LENGTH: iterations per "epoch"
    max_steps: int = 0  # >0: the whole run (all schedules compressed) takes this many iterations
    centering: str = "centering"  # centering | sinkhorn_knopp
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0..3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    checkpoint_every: int = 3750
    keep_checkpoints: int = 3
    log_every: int = 10
    resume: str = "auto"  # auto | never | <checkpoint URI>
    loader_timeout_s: int = 600  # a DataLoader worker silent this long is an error, not a hang
    collective_timeout_s: int = 1800  # a rank blocked this long in a collective (a peer died) fails
    # After SIGTERM: finish the step, checkpoint, exit 143 within this many seconds (0: the pod's
    # $DINOCTL_SIGTERM_GRACE_S, else 25 s, inside Kubernetes' default 30 s grace period).
    sigterm_grace_s: int = 0
    # One job at a time writes a run: the writer renews <store>/runs/<name>/LEASE.json every
    # lease_ttl_s / 4; another job waits until the lease is lease_ttl_s old (a killed writer), then
    # takes it, or fails after lease_ttl_s + 60 s naming the holder. 0: no lease.
    lease_ttl_s: int = 120
    # CPU, memory, disk, network and (NVIDIA) GPU utilisation of the rank-0 node, logged to the
    # stage's MLflow run as system/* metrics (MLflow's "System metrics" tab) every this many s.
    system_metrics_interval_s: float = 10.0  # 0: off


@dataclass
class DistillConfig:
    enabled: bool = False
    teacher: str = ""  # URI of our pretraining run (runs/<name>) or an official backbone file
    teacher_arch: str = "vit_giant2"
    # The student EMA (the exported model). "schedule": it moves with the momentum schedule
    # teacher.momentum_teacher -> teacher.final_momentum_teacher (cosine), as the reference's
    # distillation does (0.994 -> 1); "constant": it is held at student_ema_momentum.
    student_ema: str = "schedule"
    student_ema_momentum: float = 0.999
    # iBOT targets: "all" patches of both global crops (paper, dinov2 issue #176), or "masked":
    # the collate's masked subset (ibot.mask_* settings) of the unmasked student's patches, as
    # the distillation code released with DINOv3. See app/ssl/distill_meta_arch.py.
    ibot_patches: str = "all"
    max_steps: int = 0  # >0 replaces train.max_steps for the distillation run (one file, two stages)  # H10


@dataclass
class EmbedConfig:
    arch: str = "vit_small"
    weights: str = ""  # run URI or official backbone file; empty = the pipeline's pretrain run
    features: str = "cls"  # cls | cls+mean
    model: str = "vit"  # vit | thumbnail (weight-free 16x16 colour descriptor: tests, demo)
    image_size: int = 224
    batch_size: int = 64
    num_workers: int = 2


@dataclass
class CopyHeadConfig:
    """The copy-detection head learned on the pool (app/curation/copy_head.py)."""
    train_images: int = 2000  # pool images it is fitted on (a seeded random sample)
    views: int = 13  # per image: the image itself + views-1 copy edits
    grid: int = 4  # patch tokens pooled to grid x grid cells
    thumbnail: int = 8  # plus a colour thumbnail of this side (0: none)
    dim: int = 256
    temperature: float = 0.15
    koleo: float = 1.0
    steps: int = 400
    batch_size: int = 256


@dataclass
class DedupConfig:
    # Vectors dedup compares: auto = copy_head with a ViT embedder, the embedding itself with the
    # weight-free thumbnail; embedding = the retrieval embedding (as the paper's SSCD would be).
    descriptor: str = "auto"
    copy_head: CopyHeadConfig = field(default_factory=CopyHeadConfig)
    k: int = 64
    threshold: float = 0.6
    eval_threshold: float = 0.45
    index: str = "auto"  # auto | flat | ivf | ivfsq8 | hnsw | cells (auto: flat, then cells on CPU)
    nlist: int = 0  # IVF lists (0 = 4*sqrt(N)) or k-means cells (0 = sqrt(N))
    nprobe: int = 16  # lists / cells searched per query
    exact_below: int = 200_000  # use exact search below this many vectors
    phash_prefilter: bool = False
    representative: str = "lowest"  # lowest | central: which member a component keeps
    hnsw_m: int = 32  # HNSW graph degree (index: hnsw)
    ef_search: int = 128  # HNSW search breadth


@dataclass
class RetrieveConfig:
    k: int = 4
    cluster_hits_min: int = 3  # clusters hit by more than this many seed images contribute
    images_per_cluster: int = 10000
    per_set_cap: int = 1_000_000
    sample_based_min_size: int = 1_000_000  # seed sets at least this large use sample-based retrieval
    n_clusters: int = 100_000
    n_iters: int = 20  # k-means iterations for the pool clustering


@dataclass
class ClusterConfig:
    n_clusters: list[int] = field(default_factory=lambda: [1000, 300])
    n_resampling_steps: list[int] = field(default_factory=lambda: [10, 10])
    sample_size: list[int] = field(default_factory=lambda: [10, 10])
    n_iters: int = 50
    init: str = "kmeans++"  # kmeans++ | random | faiss
    resample_strategy: str = "closest"  # closest | random: members re-clustered per step
    target_size: int = 0  # 0: no balanced sampling
    sampling: str = "random"  # random | closest
    multiplier: int = 1


@dataclass
class CurationConfig:
    name: str = "curated"  # output dataset name: <store>/datasets/<name>
    pool: str = ""  # dataset URI of the uncurated pool
    seeds: list[str] = field(default_factory=list)  # dataset URIs of curated seed sets
    eval_sets: list[str] = field(default_factory=list)  # dataset URIs used for relative dedup
    stages: list[str] = field(default_factory=lambda: ["embed", "dedup", "retrieve", "cluster", "materialize"])
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass
class EvalConfig:
    train: str = ""  # labelled dataset URI for the k-NN bank / linear probe training
    val: str = ""  # labelled dataset URI for evaluation
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    linear_lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    linear_wds: list[float] = field(default_factory=lambda: [0.0, 1e-4])
    linear_epochs: int = 100
    linear_features: str = "cls"  # cls | cls+mean
    linear_n_last_blocks: int = 1
    image_size: int = 224
    batch_size: int = 64
    model: str = ""  # run URI (<store>/runs/<name>) or backbone file; empty = runs/<run.name>  # H9
    cache: bool = True  # reuse features under <store>/cache/features/<hash>.pt  # H9
    num_workers: int = 2  # image-decoding threads during feature extraction  # H9
    linear_batch_size: int = 256  # H9
    linear_heldout_fraction: float = 0.2  # part of train that selects (lr, wd)  # H9
    registry_name: str = ""  # registered model name; empty = dinov2-<arch>  # H9


@dataclass
class LaunchConfig:
    image: str = DEFAULT_IMAGE  # the versioned GPU image scripts/build-images makes
    replicas: int = 1  # Master + (replicas - 1) Workers
    nproc_per_node: int = 1
    restart_policy: str = "OnFailure"  # OnFailure | ExitCode | Never
    backoff_limit: int = 3
    active_deadline_seconds: int = 0
    gpus_per_node: int = 0
    cpu: str = "2"
    memory: str = "8Gi"
    namespace: str = "dinoctl"
    queue: str = ""  # Kueue LocalQueue name (label kueue.x-k8s.io/queue-name)


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["curate", "pretrain", "distill", "eval", "register"])
    synth: bool = False  # generate the synthetic data set first (demo)
    synth_size: int = 600
    # Settings for one stage's job only, "<stage>:<key>=<value>", e.g. "pretrain:launch.replicas=4"
    # or "pretrain:launch.gpus_per_node=8" (the chart's pipeline.stageLaunch writes these).
    stage_overrides: list[str] = field(default_factory=list)
    # One driver at a time per pipeline run: it holds <store>/runs/<run.name>/pipeline/LEASE.json,
    # renewed every lease_ttl_s / 4; another driver is refused after 1.5 x lease_ttl_s + 2 s while
    # it stays fresh, or takes over the lease of a killed one (not renewed for lease_ttl_s) and
    # adopts its jobs.
    lease_ttl_s: int = 60


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    student: ModelConfig | None = None  # distillation: the student architecture (model = teacher)


# ----------------------------------------------------------------------------------------------
# Loading, merging and coercion
# ----------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key` and `source`."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' must not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = _parse_scalar(value)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{source}: '{key}' must be a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{source}: '{key}' must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: '{key}' must be a float, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict, prefix: str, source: str, base: Any = None) -> Any:
    """Build dataclass `cls` from `data`, starting from `base` (or the defaults)."""
    obj = base if base is not None else cls()
    hints = _hints(cls)
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        tp = hints[key]
        inner, _ = _unwrap_optional(tp)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            start = current if current is not None else inner()
            setattr(obj, key, _build(inner, value, full, source, base=start))
        else:
            setattr(obj, key, _coerce(value, tp, full, source))
    return obj


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def resolve_preset(preset: str | Path) -> Path:
    """A preset is a path to a YAML file or the name of one in `config_dirs()`."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    name = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else str(preset)
    dirs = config_dirs()
    for d in dirs:
        candidate = d / f"{name}.yaml"
        if candidate.exists():
            return candidate
    if path.suffix in (".yaml", ".yml") and (len(path.parts) > 1 or not dirs):
        raise ConfigError(f"config file '{preset}' not found")
    available = ", ".join(sorted({p.stem for d in dirs for p in d.glob("*.yaml")}))
    where = ", ".join(str(d) for d in dirs) or "no preset directory exists (set DINOCTL_CONFIG_DIR)"
    raise ConfigError(f"config preset '{preset}' not found (a .yaml path or one of: "
                      f"{available or '(none)'}; looked in {where})")


def _parse_yaml(text: str, source: str | Path) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{where} invalid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    return data


def _read_yaml(path: Path) -> dict:
    return _parse_yaml(path.read_text(), path)


def _load_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """A preset may name `_base_: other.yaml` (relative to itself); bases apply first."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ cycle")
    data = _read_yaml(path)
    base = data.pop("_base_", None)
    layers: list[tuple[dict, str]] = []
    if base:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            try:  # a preset by name: a stage config mounted from a ConfigMap can build on one
                base_path = resolve_preset(Path(str(base)).stem if str(base).endswith(
                    (".yaml", ".yml")) else str(base))
            except ConfigError:
                raise ConfigError(f"{path}: _base_ '{base}' is neither a file next to it nor a "
                                  "preset") from None
        layers += _load_layers(base_path, seen + (path.resolve(),))
    layers.append((data, str(path)))
    return layers


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{item}': empty key")
    return key.split("."), _parse_scalar(value)


def _target_type(keys: list[str]) -> Any:
    """The declared type of the dotted field `keys`, or None if there is no such field."""
    cls: Any = Config
    tp: Any = None
    for key in keys:
        cls, _ = _unwrap_optional(cls)
        if not dataclasses.is_dataclass(cls):
            return None
        tp = _hints(cls).get(key)
        if tp is None:
            return None
        cls = tp
    return tp


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    for item in overrides or []:
        keys, value = parse_override(item)
        if _target_type(keys) is str:
            # A string field takes the text as typed: YAML would turn `0123` into 83 and `yes`
            # into True before we ever saw it.
            value = item.split("=", 1)[1].strip()
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _build(Config, nested, "", f"--set {item}", base=cfg)
    return cfg


def _uri_layers(uri: str) -> list[tuple[dict, str]]:
    """A config file in storage (`s3://...`, `file://...`: a pipeline stage's resolved config);
    its `_base_`, if any, names a preset."""
    from app import storage

    try:
        text = storage.get_bytes(uri).decode()
    except storage.StorageError as exc:
        raise ConfigError(f"config {uri}: {exc}") from None
    data = _parse_yaml(text, uri)
    base = data.pop("_base_", None)
    layers = _load_layers(resolve_preset(base)) if base else []
    return layers + [(data, uri)]


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the preset (and its `_base_` chain), then `--set` overrides. `preset` may
    be a storage URI of a config file (what a pipeline hands its stage jobs)."""
    cfg = Config()
    if preset is not None:
        from_store = isinstance(preset, str) and "://" in preset
        layers = _uri_layers(preset) if from_store else _load_layers(resolve_preset(preset))
        for data, source in layers:
            _build(Config, data, "", source, base=cfg)
    cfg = apply_overrides(cfg, overrides)
    resolve_locations(cfg)
    validate(cfg)
    return cfg


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, data, "", source)
    resolve_locations(cfg)
    validate(cfg)
    return cfg


def resolve_locations(cfg: Config) -> Config:
    """Fill an empty `run.store` with `default_store()` and replace `${run.store}` in every
    string value (lists included) by it. In place; returns cfg."""
    store = (cfg.run.store or default_store()).rstrip("/")
    if STORE_REF in store:
        raise ConfigError(f"'run.store' cannot refer to itself: {cfg.run.store!r}")
    cfg.run.store = store

    def visit(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, str) and STORE_REF in value:
                setattr(obj, f.name, value.replace(STORE_REF, store))
            elif isinstance(value, list):
                setattr(obj, f.name, [v.replace(STORE_REF, store) if isinstance(v, str) else v
                                      for v in value])
            elif dataclasses.is_dataclass(value):
                visit(value)

    visit(cfg)
    return cfg


_CHOICES = {
    "model.ffn_layer": ("mlp", "swiglu", "swiglufused"),
    "crops.blur_mode": ("official", "intended"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "train.precision": ("auto", "bf16", "fp32"),
    "optim.clip_grad_mode": ("per_module", "global"),
    "distill.student_ema": ("schedule", "constant"),
    "distill.ibot_patches": ("all", "masked"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "launch.restart_policy": ("OnFailure", "ExitCode", "Never"),
    "curation.embed.features": ("cls", "cls+mean"),
    "curation.dedup.index": ("auto", "flat", "ivf", "ivfsq8", "hnsw", "cells"),
    "curation.dedup.representative": ("lowest", "central"),
    "curation.dedup.descriptor": ("auto", "embedding", "copy_head"),
    "curation.embed.model": ("vit", "thumbnail"),
    "curation.cluster.resample_strategy": ("closest", "random"),
    "curation.cluster.init": ("kmeans++", "faiss", "random"),
    "curation.cluster.sampling": ("random", "closest"),
    "eval.linear_features": ("cls", "cls+mean"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"'{key}' must be one of {', '.join(choices)}, got {value!r}")
    for item in cfg.pipeline.stage_overrides:
        stage, sep, setting = item.partition(":")
        if not sep or not stage or "=" not in setting:
            raise ConfigError(f"'pipeline.stage_overrides': '{item}' is not <stage>:<key>=<value>")
    if not 0 <= cfg.train.zero_stage <= 3:
        raise ConfigError(f"'train.zero_stage' must be 0..3, got {cfg.train.zero_stage}")
    if cfg.train.batch_size_per_gpu < 1:
        raise ConfigError("'train.batch_size_per_gpu' must be >= 1")
    lo, hi = cfg.ibot.mask_ratio_min_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"'ibot.mask_ratio_min_max' must satisfy 0 <= min <= max <= 1, got {[lo, hi]}")
    if cfg.curation.dedup.descriptor == "copy_head" and cfg.curation.embed.model != "vit":
        raise ConfigError("'curation.dedup.descriptor' copy_head needs curation.embed.model vit, got "
                          f"{cfg.curation.embed.model!r}")
    for key in ("curation.dedup.copy_head.views", "curation.dedup.copy_head.train_images"):
        if _get(cfg, key) < 2:
            raise ConfigError(f"'{key}' must be >= 2, got {_get(cfg, key)}")
    for key in ("crops.global_crops_size", "crops.local_crops_size"):
        if _get(cfg, key) % cfg.model.patch_size:
            raise ConfigError(f"'{key}' must be a multiple of model.patch_size ({cfg.model.patch_size})")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """`{"train.batch_size_per_gpu": 64, ...}` for MLflow params."""
    data = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def scaled_lr(cfg: Config, world_size: int) -> float:
    """The peak learning rate after the batch-size scaling rule of the recipe."""
    global_batch = cfg.train.batch_size_per_gpu * world_size
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        return cfg.optim.base_lr * (global_batch / 1024.0) ** 0.5
    if rule == "linear_wrt_256":
        return cfg.optim.base_lr * global_batch / 256.0
    return cfg.optim.base_lr
