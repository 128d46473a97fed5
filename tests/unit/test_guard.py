"""The suite's guard of the user's state (tests/guard.py, wired in tests/conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

from tests.guard import USER_STATE, describe_change, fingerprint

ROOT = Path(__file__).resolve().parents[2]


def test_guard_names_what_a_test_wrote_into_the_user_state(tmp_path):
    (tmp_path / ".dinoctl").mkdir()
    (tmp_path / ".dinoctl" / "mlflow.db").write_bytes(b"user's runs")
    before = fingerprint(tmp_path)
    assert describe_change(before, fingerprint(tmp_path)) is None
    (tmp_path / ".dinoctl" / "jobs").mkdir()
    (tmp_path / ".dinoctl" / "jobs" / "netns-pt.json").write_text("{}")
    (tmp_path / "mlruns").mkdir()
    problem = describe_change(before, fingerprint(tmp_path))
    assert "created" in problem and ".dinoctl/jobs/netns-pt.json" in problem and "mlruns" in problem
    (tmp_path / ".dinoctl" / "mlflow.db").write_bytes(b"user's runs, and one more")
    changed = describe_change(before, fingerprint(tmp_path)).split("changed ")[1]
    assert ".dinoctl/mlflow.db" in changed


def test_a_process_started_in_the_checkout_writes_its_embedded_store_outside_it():
    """What test_multinode_netns's jobs do: run with the checkout as working directory."""
    code = "from app.tracking.store import embedded_store; print(embedded_store()[0])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("sqlite:///")
    store = Path(out[len("sqlite:///"):])
    assert not any(store.is_relative_to(ROOT / name) for name in USER_STATE), store
