"""`dinoctl export <run-uri> [--out URI]`: a run's model as files anyone can load.

Writes `<out>/backbone.pth` (official DINOv2 key schema: `load_state_dict(strict=True)` into our
or the official ViT), `heads.pth` (`{"dino_head": sd, "ibot_head": sd?}`), `config.yaml`,
`summary.json`, then `_SUCCESS` last. The source is the run's `export/` when it exists (copied),
otherwise the checkpoint named by `checkpoints/LATEST`. Default `out` is `<run>/export`.
After writing, the backbone is reloaded strictly and checked to give the same features.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch
import yaml

from app import storage
from app.eval.model_ref import (EXPORT_DIR, ModelNotFound, arch_name, latest_checkpoint,
                                model_from_state_dict, weights_from_checkpoint)

log = logging.getLogger(__name__)

FILES = ("backbone.pth", "heads.pth", "config.yaml")


def _minimal_config(model) -> str:
    """A config.yaml that `load_config` accepts, describing the backbone shape."""
    section: dict[str, Any] = {
        "arch": arch_name(model).split("_reg")[0],
        "patch_size": model.patch_size, "img_size": model.img_size,
        "num_register_tokens": model.num_register_tokens,
        "interpolate_offset": model.interpolate_offset,
        "interpolate_antialias": model.interpolate_antialias,
    }
    return yaml.safe_dump({"model": section}, sort_keys=False)


def verify_export(backbone_uri: str, reference, image_size: int | None = None) -> float:
    """Reload `backbone_uri` strictly and return max |feature difference| against `reference`."""
    from app.models.convert import load_backbone

    loaded = load_backbone(backbone_uri, **{k: getattr(reference, k) for k in
                                            ("interpolate_offset", "interpolate_antialias")})
    size = image_size or reference.patch_size * 2
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return float((loaded(x) - reference.eval()(x)).abs().max())


def export_run(run_uri: str, out: str | None = None, from_checkpoint: bool = False,
               config_yaml: str | None = None) -> dict[str, Any]:
    """Export `run_uri` (see module docstring); returns the export summary."""
    run = storage.to_uri(run_uri).rstrip("/")
    out = storage.to_uri(out).rstrip("/") if out else storage.join(run, EXPORT_DIR)
    existing = storage.join(run, EXPORT_DIR)
    has_export = storage.exists(storage.join(existing, "backbone.pth"))
    if has_export and not from_checkpoint:
        if out == existing:
            log.info("export: %s already exported", run)
            return storage.get_json(storage.join(existing, "summary.json")) \
                if storage.exists(storage.join(existing, "summary.json")) else {"out": out}
        copied = [name for name in FILES if storage.exists(storage.join(existing, name))]
        for name in copied:
            storage.copy(storage.join(existing, name), storage.join(out, name))
        summary = {"run": run, "out": out, "source": existing, "files": copied}
        storage.put_json(storage.join(out, "summary.json"), summary)
        storage.put_bytes(storage.join(out, "_SUCCESS"), b"")
        log.info("export: copied %s -> %s", existing, out)
        return summary

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ModelNotFound(f"{run}: no export/ and no checkpoints/LATEST to export from")
    backbone_sd, heads, prefix = weights_from_checkpoint(ckpt)
    model = model_from_state_dict(backbone_sd)
    from app.models.convert import export_backbone

    export_backbone(model, storage.join(out, "backbone.pth"))
    buf = io.BytesIO()
    torch.save({k: {n: t.detach().cpu() for n, t in sd.items()} for k, sd in heads.items()}, buf)
    storage.put_bytes(storage.join(out, "heads.pth"), buf.getvalue())
    storage.put_bytes(storage.join(out, "config.yaml"), (config_yaml or _minimal_config(model)).encode())
    diff = verify_export(storage.join(out, "backbone.pth"), model)
    if diff != 0.0:
        raise RuntimeError(f"export {out}: reloaded backbone differs by {diff:g}")
    summary = {"run": run, "out": out, "source": ckpt, "network": prefix, "arch": arch_name(model),
               "files": list(FILES), "heads": sorted(heads),
               "num_params": sum(t.numel() for t in backbone_sd.values())}
    storage.put_json(storage.join(out, "summary.json"), summary)
    storage.put_bytes(storage.join(out, "_SUCCESS"), b"")
    log.info("export: %s (%s of %s) -> %s", summary["arch"], prefix, ckpt, out)
    return summary
