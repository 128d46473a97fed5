"""The chart's platform in the podman harness: its objects applied, the S3 (SeaweedFS) and MLflow
pods running from the services image, and helpers to look into them from the host."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import uuid

from tests.k8s.cluster import PodmanCluster
from tests.k8s.render import ROOT, render_chart

NS = "ml"
VALUES = ROOT / "helm" / "dinoctl" / "values-ci.yaml"
INIT_TEMPLATE = (ROOT / "k8s" / "operator" / "init-container.yaml").read_text()
STAGE_TIMEOUT = 900


class Stack:
    def __init__(self, cluster: PodmanCluster, docs: list[dict]):
        self.cluster, self.docs = cluster, docs
        self.by_kind = {}
        for d in docs:
            self.by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
        self.secret = cluster.secrets["dinoctl-s3"]

    def job(self, stage: str) -> dict:
        return self.by_kind["PyTorchJob"][f"dinoctl-{stage}"]

    def s3(self):
        from minio import Minio

        return Minio(f"{self.cluster.ip('dinoctl-s3-0')}:9000", access_key=self.secret["AWS_ACCESS_KEY_ID"],
                     secret_key=self.secret["AWS_SECRET_ACCESS_KEY"], secure=False, region="us-east-1")

    def s3_json(self, key: str):
        resp = self.s3().get_object("dinoctl", key)
        try:
            return json.loads(resp.read())
        finally:
            resp.close()
            resp.release_conn()

    def s3_exists(self, key: str) -> bool:
        return any(True for _ in self.s3().list_objects("dinoctl", prefix=key))

    def mlflow(self, path: str, body: dict) -> dict:
        """MLflow's REST API from the host, with a Host header the server allows."""
        pod = next(n for n in self.cluster.containers if n.startswith("dinoctl-mlflow"))
        conn = http.client.HTTPConnection(self.cluster.ip(pod), 5000, timeout=30)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                     "Host": "dinoctl-mlflow:5000"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data[:500])
        return json.loads(data)

    def run(self, job: dict, **kw) -> dict[str, int]:
        results = self.cluster.run_pytorchjob(job, timeout=STAGE_TIMEOUT, **kw)
        if any(results.values()):
            logs = "\n".join(f"--- {p}\n{self.cluster.logs(p)[-4000:]}" for p in results)
            raise AssertionError(f"{job['metadata']['name']}: {results}\n{logs}")
        return results

    def s3_env(self) -> dict[str, str]:
        """What a process on the host needs to use the chart's S3 server."""
        return {"S3_ENDPOINT_URL": f"http://{self.cluster.ip('dinoctl-s3-0')}:9000",
                "AWS_ACCESS_KEY_ID": self.secret["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": self.secret["AWS_SECRET_ACCESS_KEY"], "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def start_stack(images: dict, workdir):
    """The chart (values-ci.yaml, the CPU image for jobs) applied to a fresh podman cluster with
    its S3 and MLflow pods ready; yields the Stack."""
    docs = render_chart("-f", str(VALUES), "--set", f"image.tag={images['cpu'].rsplit(':', 1)[1]}",
                        namespace=NS)
    cluster = PodmanCluster(network=f"dinoctl-test-{uuid.uuid4().hex[:8]}",
                            workdir=workdir, namespace=NS,
                            init_template=INIT_TEMPLATE, init_image=images["cpu"])
    with cluster:
        workloads = cluster.apply(docs)
        stack = Stack(cluster, docs)
        stack.image, stack.services_image = images["cpu"], images["services"]
        s3 = stack.by_kind["StatefulSet"]["dinoctl-s3"]
        mlflow = stack.by_kind["Deployment"]["dinoctl-mlflow"]
        for obj in (s3, mlflow):  # the chart's own pods, from the image built here, unchanged
            assert obj["spec"]["template"]["spec"]["containers"][0]["image"] == images["services"]
        stack.ready_s = {}
        for name, obj in (("s3", s3), ("mlflow", mlflow)):
            t0 = time.monotonic()
            cluster.run_service(obj)
            stack.ready_s[name] = round(time.monotonic() - t0, 1)
        print(json.dumps({"cold_start_to_ready_s": stack.ready_s}))
        stack.workloads = workloads
        yield stack
