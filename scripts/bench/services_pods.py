#!/usr/bin/env python
"""The chart's platform pods from the services image: image sizes, cold start to ready of the
S3 (SeaweedFS) and MLflow pods, and the training loader's read throughput from that S3 pod, as JSON.

    .venv/bin/python scripts/bench/services_pods.py [--repeats 3] [--images 3000] [--no-loader]

Needs podman and the images `scripts/test-k8s` builds. Renders the default chart and runs its
SeaweedFS StatefulSet pod and MLflow Deployment pod unchanged in the podman harness of
tests/k8s/cluster.py (one network, the chart's Secret and ConfigMaps, PVCs as directories). Cold
start: `podman run` to the readiness probe passing, on an empty PVC, `--repeats` times. Then the
bucket-bootstrap hook, and `scripts/bench/data_read.py --s3-endpoint <the S3 pod>` (file:// beside
it for reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.k8s.cluster import PodmanCluster, podman  # noqa: E402
from tests.k8s.render import render_chart  # noqa: E402

NS = "ml"


def _size(image: str) -> int:
    return int(podman("image", "inspect", image, "--format", "{{.Size}}").stdout.strip())


def _cluster(workdir: Path) -> PodmanCluster:
    return PodmanCluster(network=f"dinoctl-bench-{uuid.uuid4().hex[:8]}", workdir=workdir, namespace=NS)


def _by(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=3000, help="data_read.py --images")
    p.add_argument("--no-loader", action="store_true", help="skip the data_read.py run")
    args = p.parse_args(argv)
    conf = ROOT / ".venv" / "containers.conf"  # runc and ulimits for these machines (scripts/test-k8s)
    if "CONTAINERS_CONF" not in os.environ and conf.exists():
        os.environ["CONTAINERS_CONF"] = str(conf)
    services = f"ghcr.io/dinoctl/dinoctl:{args.version}-services"
    cpu = f"ghcr.io/dinoctl/dinoctl:{args.version}-cpu"
    docs = render_chart("--set", f"image.tag={args.version}", "--set", "networkPolicy.enabled=false",
                        namespace=NS)
    s3, mlflow = _by(docs, "StatefulSet", "dinoctl-s3"), _by(docs, "Deployment", "dinoctl-mlflow")
    result: dict = {"benchmark": "services_pods", "cpus": os.cpu_count(),
                    "image_bytes": {"services": _size(services), "cpu": _size(cpu)},
                    "cold_start_to_ready_s": {"s3": [], "mlflow": []}}
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        for i in range(args.repeats):
            cluster = _cluster(Path(tmp) / f"run{i}")
            with cluster:
                cluster.apply(docs)
                for name, obj in (("s3", s3), ("mlflow", mlflow)):
                    t0 = time.monotonic()
                    cluster.run_service(obj)
                    result["cold_start_to_ready_s"][name].append(round(time.monotonic() - t0, 2))
                if i < args.repeats - 1 or args.no_loader:
                    continue
                hook = _by(docs, "Job", "dinoctl-bucket-bootstrap")
                if cluster.run_job(hook, timeout=300) != 0:
                    raise SystemExit(cluster.logs("dinoctl-bucket-bootstrap-0"))
                keys = cluster.secrets["dinoctl-s3"]
                env = dict(os.environ, AWS_ACCESS_KEY_ID=keys["AWS_ACCESS_KEY_ID"],
                           AWS_SECRET_ACCESS_KEY=keys["AWS_SECRET_ACCESS_KEY"], AWS_DEFAULT_REGION="us-east-1")
                endpoint = f"http://{cluster.ip('dinoctl-s3-0')}:9000"
                proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "data_read.py"),
                                       "--images", str(args.images), "--s3-endpoint", endpoint,
                                       "--s3-uri", "s3://dinoctl/bench/pool"],
                                      env=env, capture_output=True, text=True, timeout=3600)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                read = json.loads(proc.stdout)
                result["loader_from_the_s3_pod"] = {
                    "endpoint": "the chart's SeaweedFS pod (podman bridge network)",
                    "s3": read["s3"], "file_reference": read["file"]}
    for name, values in result["cold_start_to_ready_s"].items():
        result[f"{name}_ready_s_median"] = sorted(values)[len(values) // 2]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
