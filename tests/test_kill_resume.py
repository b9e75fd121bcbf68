"""A training stage killed with SIGKILL at several points resumes and ends with the same model."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_pipeline import run
from tiny_params import copy_project

pytestmark = pytest.mark.slow


def project(dst: Path) -> dict:
    return copy_project(dst, {"data.limit": 640, "train.epochs": 3, "train.checkpoint_every": 5})


def checkpoint_step(path: Path) -> int:
    from diffusion_core.checkpoint import load_file

    try:
        return int(load_file(path, "training checkpoint")["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def test_sigkill_at_several_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    env_a, env_b = project(a), project(b)
    run([sys.executable, "-m", "stages.prepare"], a, env=env_a)
    shutil.copytree(a / "data", b / "data")
    run([sys.executable, "-m", "stages.train"], a, env=env_a)  # 60 steps, never interrupted

    ckpt = b / "models" / "checkpoint.pt"
    kills = []
    for target in (5, 25, 45):  # after the first checkpoint, mid epoch 2, mid epoch 3
        proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=b, env=env_b,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while checkpoint_step(ckpt) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(checkpoint_step(ckpt))
        assert not (b / "models" / "model.pt").exists()  # killed before the end
    assert kills[0] >= 5 and kills[-1] >= 45 and kills == sorted(kills)
    res = run([sys.executable, "-m", "stages.train"], b, env=env_b)
    assert "resuming from" in res.stdout

    wa = torch.load(a / "models" / "model.pt", weights_only=True)["model"]
    wb = torch.load(b / "models" / "model.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the loss curve is complete: one row per step, the same values
    assert (a / "reports/plots/train_loss.csv").read_text() == (b / "reports/plots/train_loss.csv").read_text()
    # no run is left RUNNING: each killed stage's run was ended KILLED by the next stage that started
    assert run_statuses(b) == {"FINISHED": 1, "KILLED": 3}


def run_statuses(project_dir: Path) -> dict[str, int]:
    import sqlite3
    from collections import Counter

    with sqlite3.connect(project_dir / "mlflow.db") as db:
        return dict(Counter(status for (status,) in db.execute("select status from runs")))


def test_sigterm_ends_the_run_killed_and_keeps_the_checkpoint(tmp_path):
    env = project(tmp_path)
    run([sys.executable, "-m", "stages.prepare"], tmp_path, env=env)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while checkpoint_step(tmp_path / "models" / "checkpoint.pt") < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and not (tmp_path / "models" / "model.pt").exists(), err[-2000:]
    assert run_statuses(tmp_path) == {"KILLED": 1}  # at once, not left for a later stage to find
    assert checkpoint_step(tmp_path / "models" / "checkpoint.pt") >= 5
