"""Real training jobs for fault-injection tests, started the way a pod starts them.

    job = TrainJob(tmp, run="r", dataset=uri, store=uri, nproc=2, workers=2)
    job.start(); job.wait_step(3); os.kill(job.pid, signal.SIGTERM); rc = job.wait()
    job.losses(rank=0)    # [total_loss per step] from the sample log (DINOCTL_SAMPLE_LOG)

The command is the pods' own: `torchrun -m app.entry pretrain --config demo --set ...` with the
venv's `torchrun` (dinoctl's wrapper, as in the images), in its own session so a test can signal
the launcher exactly as the kubelet signals PID 1, and kill the whole tree afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The pods' launcher; DINOCTL_TEST_TORCHRUN points elsewhere (e.g. torch's own, to show a defect).
TORCHRUN = os.environ.get("DINOCTL_TEST_TORCHRUN") or str(Path(sys.executable).parent / "torchrun")

TINY = {
    "crops.global_crops_size": 42, "crops.local_crops_size": 14, "crops.local_crops_number": 2,
    "model.img_size": 42, "model.drop_path_rate": 0.1,
    "dino.head_n_prototypes": 64, "dino.head_hidden_dim": 32, "dino.head_bottleneck_dim": 16,
    "ibot.head_n_prototypes": 64, "train.batch_size_per_gpu": 4, "train.log_every": 1,
    "train.zero_stage": 2, "optim.freeze_last_layer_epochs": 1,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synth_pool(store_uri: str, name: str = "synth", n_pool: int = 48) -> str:
    """A small synthetic pool (no corrupt images) at `<store>/datasets/<name>/pool`."""
    from app.data.synth import synthesize

    uri = f"{store_uri.rstrip('/')}/datasets/{name}"
    synthesize(uri, seed=0, n_pool=n_pool, n_seeds=4, n_eval_train=8, n_eval_val=8, image_size=48,
               n_corrupt=0, max_samples_per_shard=16)
    return uri + "/pool"


@dataclass
class TrainJob:
    tmp: Path
    run: str
    dataset: str
    store: str
    stage: str = "pretrain"
    nproc: int = 1
    workers: int = 0
    steps: int = 6
    checkpoint_every: int = 2
    env: dict[str, str] = field(default_factory=dict)
    sets: dict[str, object] = field(default_factory=dict)
    launcher: tuple[str, ...] = ()  # torchrun options instead of --nproc-per-node/--master-port
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.tmp / f"{self.run}{self.env.get('DINOCTL_LOG_SUFFIX', '')}.log"

    def command(self, *extra: str) -> list[str]:
        sets = {**TINY, "run.name": self.run, "run.store": self.store, "train.dataset": self.dataset,
                "train.num_workers": self.workers, "train.max_steps": self.steps,
                "train.checkpoint_every": self.checkpoint_every, **self.sets}
        launcher = list(self.launcher) or ["--nproc-per-node", str(self.nproc),
                                           "--master-port", str(free_port())]
        cmd = [TORCHRUN, *launcher, "-m", "app.entry", self.stage, "--config", "demo"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        return cmd + list(extra)

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PET_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                   DINOCTL_STAGING=str(self.tmp / "staging" / self.run),
                   DINOCTL_HOME=str(self.tmp / "home"),
                   DINOCTL_SAMPLE_LOG=str(self.tmp / f"samples-{self.run}"))
        if "MLFLOW_TRACKING_URI" not in self.env:
            # what these jobs test is not tracking (test_faults_services's MLflow tests name a
            # server): skip MLflow's import and store, seconds of CPU per job on 2 cores
            env["DINOCTL_TRACKING"] = "off"
        env.update(self.env)
        return env

    def start(self, *extra: str) -> "TrainJob":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(*extra), cwd=REPO, env=self.environ(),
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, timeout: float = 240.0) -> int:
        """The launcher's exit code (128 + N for death by signal N, as a container reports it)."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.run} still running after {timeout:.0f} s:\n{self.tail()}")
        finally:
            self.kill()  # nothing of the tree may outlive the test
        return 128 - rc if rc < 0 else rc

    def run_to_end(self, *extra: str, timeout: float = 240.0) -> int:
        return self.start(*extra).wait(timeout)

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, n: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def samples(self, rank: int = 0) -> list[dict]:
        path = self.tmp / f"samples-{self.run}.rank{rank}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def losses(self, rank: int = 0) -> dict[int, float]:
        """step -> total_loss; a step logged twice (before a crash and after resuming) keeps the
        last value, which is the one the finished run stands on."""
        return {row["step"]: row["losses"]["total_loss"] for row in self.samples(rank)}

    def wait_step(self, step: int, timeout: float = 180.0) -> None:
        """Block until rank 0 finished step `step` (0-based)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(row["step"] >= step for row in self.samples(0)):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.run} exited with {self.proc.returncode} before step "
                                     f"{step}:\n{self.tail()}")
            time.sleep(0.02)
        raise AssertionError(f"{self.run} did not reach step {step} in {timeout:.0f} s:\n{self.tail()}")

    def worker_pids(self) -> list[int]:
        """The training processes (torchrun's children)."""
        return children(self.pid)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        for child in children(stack.pop()):
            out.append(child)
            stack.append(child)
    return out


def assert_same_trajectory(got: dict[int, float], want: dict[int, float], steps: int,
                           tol: float = 1e-6) -> None:
    assert sorted(got) == list(range(steps)), f"steps {sorted(got)}"
    for step in range(steps):
        assert abs(got[step] - want[step]) <= tol, f"step {step}: {got[step]} != {want[step]}"
