"""Tracking outages lose nothing: a real MLflow server, a server that dies mid-run, concurrent runs.

The server is the real `mlflow server` on 127.0.0.1 (SQLite backend in a temp dir); the stages run
as subprocesses in temporary copies of the project with tiny params, exactly as `dvc repro` runs them.
"""

import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from test_pipeline import run
from tiny_params import copy_project

# long enough that the server can be killed while training runs (80 steps of 32)
OVERRIDES = {"data.limit": 640, "train.epochs": 4, "train.checkpoint_every": 10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.port = port or free_port()  # a port given: a restart where a killed server listened
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
               "--artifacts-destination", (root / "artifacts").as_uri()]
        # no background job workers (7 extra processes in MLflow 3): the tracking API is what is tested
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"),
                                     start_new_session=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                break
        self.kill()
        raise AssertionError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, like a crash
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(name: str = "server", port: int | None = None) -> Server:
        servers.append(Server(tmp_path / name, port))
        return servers[-1]

    yield start
    for s in servers:
        s.kill()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A project copy with prepared data; tests copy its data/ into their own copies."""
    dst = tmp_path_factory.mktemp("outage") / "base"
    env = copy_project(dst, OVERRIDES)
    run([sys.executable, "-m", "stages.prepare"], dst, env=env)
    return dst


def project(prepared: Path, dst: Path, uri: str) -> dict:
    import shutil

    env = copy_project(dst, OVERRIDES)
    shutil.copytree(prepared / "data", dst / "data")
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(uri: str):
    c = client(uri)
    exp = c.get_experiment_by_name("digit-diffusion")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return c, runs[0]


@pytest.mark.slow
def test_runs_land_on_a_real_server_and_a_server_dying_mid_run_costs_nothing(tmp_path, prepared, server):
    # 1. a healthy server: train and sample land in one run on it
    srv = server("healthy")
    a = tmp_path / "a"
    env_a = project(prepared, a, srv.uri)
    t0 = time.time()
    run([sys.executable, "-m", "stages.train"], a, env=env_a)
    healthy_s = time.time() - t0
    run([sys.executable, "-m", "stages.sample"], a, env=env_a)
    c, r = only_run(srv.uri)
    lr = yaml.safe_load((a / "params.yaml").read_text())["train"]["lr"]
    assert r.data.params["train.lr"] == str(lr) and r.data.tags["stage.sample"] == "done"  # the run's own params
    steps = json.loads((a / "reports/metrics/train.json").read_text())["steps"]
    assert steps == 80 and len(c.get_metric_history(r.info.run_id, "train/loss")) == steps
    assert "sample/seconds_per_image" in r.data.metrics
    assert len(r.outputs.model_outputs) == 1  # the MLflow Model, logged and registered
    assert [m.name for m in c.search_logged_models(experiment_ids=[r.info.experiment_id])] == ["model"]
    assert [v.version for v in c.search_model_versions("name = 'digit-diffusion'")] in (["1"], [1])
    assert '"tracking_complete": true' in (a / "models" / "run.json").read_text()

    # 2. the same training, its server killed (SIGKILL) after the first checkpoint
    srv2 = server("dying")
    b = tmp_path / "b"
    env_b = project(prepared, b, srv2.uri)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=b, env=env_b,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (b / "models" / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    srv2.kill()
    killed_at = time.time()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert (b / "models" / "model.pt").stat().st_mtime >= killed_at  # training went on after the kill
    assert "warning: MLflow tracking at" in err and srv2.uri in err
    assert err.count("warning: MLflow tracking at") == 1  # one warning, not one per call
    assert time.time() - t0 < healthy_s + 60  # no minutes of HTTP retries per call
    # nothing of DVC's is lost: every out and metric is written, and the model is bit-identical to
    # the one trained while the server was healthy
    for out_file in ["models/model.pt", "models/checkpoint.pt", "models/run.json", "reports/metrics/train.json",
                     "reports/plots/train_loss.csv", "reports/plots/val_loss.csv", "models/grids/epoch_004.png"]:
        assert (b / out_file).is_file(), out_file
    wa, wb = weights(a / "models" / "model.pt"), weights(b / "models" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "reports/plots/train_loss.csv").read_text() == (b / "reports/plots/train_loss.csv").read_text()
    assert '"tracking_complete": false' in (b / "models" / "run.json").read_text()

    # 3. the next stage with the server still down fails at its start, within seconds, one line
    t0 = time.time()
    res = run([sys.executable, "-m", "stages.sample"], b, check=False, env=env_b)
    assert res.returncode != 0 and time.time() - t0 < 60
    assert res.stderr.strip().splitlines()[-1].startswith("error: MLFLOW_TRACKING_URI=")
    assert not (b / "samples").exists()


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return -1


def loss_points_in_db(db: Path) -> int:
    """How many train/loss points the server has stored (read from its SQLite file, not through it)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("select count(*) from metrics where key='train/loss'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        con.close()


@pytest.mark.slow
def test_points_unsent_while_the_server_was_down_are_resent_when_it_restarts(tmp_path, prepared, server):
    """The server dies after epoch 1 was logged, misses at least one epoch's flush, and comes back on
    the same database and port while training goes on: the run ends FINISHED with every loss point."""
    srv = server("restarted")
    d = tmp_path / "r"
    env = project(prepared, d, srv.uri)
    db = tmp_path / "restarted" / "server.db"
    err_path = tmp_path / "train.err"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=d, env=env,
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    try:
        deadline = time.time() + 300
        # 1. epoch 1's flush (20 steps of 80) has landed on the server: kill it
        while loss_points_in_db(db) < 20 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "training ended before the server could be killed"
        logged_before = loss_points_in_db(db)
        srv.kill()
        # 2. epoch 2 ended while it was down (its checkpoint, step 40, is saved after the epoch's flush):
        # that flush failed and its points stay in the logger's buffer
        while checkpoint_step(d / "models" / "checkpoint.pt") < 40 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before the server could be restarted"
        # 3. restart on the same database file and port. The trainer is paused while the server starts
        # (seconds on a busy machine), so that the restart comes before the stage's last flush whatever
        # the machine's load; it trains on (epochs 3 and 4) once the server answers.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            assert " failed during " in err_path.read_text()  # epoch 2's flush (or epoch 1's grid upload, if the kill hit it)
            srv2 = server("restarted", port=srv.port)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert srv2.uri == srv.uri
        proc.wait(timeout=max(10, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_path.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("warning: MLflow tracking at") == 2, err[-3000:]  # one warning, then one "answers again"
    assert err.count(" failed during ") == 1 and err.count("answers again; logging resumed") == 1, err[-3000:]

    c, r = only_run(srv2.uri)
    assert r.info.status == "FINISHED" and r.data.tags.get("stage.train") == "done"
    steps = json.loads((d / "reports/metrics/train.json").read_text())["steps"]
    with open(d / "reports/plots/train_loss.csv") as f:
        csv_points = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}
    history = c.get_metric_history(r.info.run_id, "train/loss")
    got = {m.step: m.value for m in history}
    assert steps == 80 and len(csv_points) == steps
    assert 20 <= logged_before < 40  # epoch 1's points were sent before the outage, epoch 2's not
    assert len(history) == steps, f"{len(history)} loss points in MLflow, {steps} steps trained"  # none twice
    assert got == csv_points  # every step, with the value the stage wrote for it
    assert len(c.get_metric_history(r.info.run_id, "train/val_loss")) == 4  # one per epoch, resent too


@pytest.mark.slow
def test_two_concurrent_training_runs_share_one_new_sqlite_database(tmp_path, prepared):
    db = tmp_path / "shared" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    dirs = [tmp_path / "p", tmp_path / "q"]
    envs = [project(prepared, d, uri) for d in dirs]
    # both start at once on a database that does not exist yet (schema creation races too)
    procs = [subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=d, env=e,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d, e in zip(dirs, envs)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "warning: MLflow" not in err, err[-3000:]  # nothing was dropped on a lock
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("digit-diffusion").experiment_id])
    assert len(runs) == 2
    for r in runs:
        assert len(c.get_metric_history(r.info.run_id, "train/loss")) == 80
        assert r.data.tags.get("stage.train") == "done"


def test_safe_call_warns_once_and_resumes(monkeypatch, tmp_path, capsys):
    from diffusion_core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setattr(tracking._Health, "down", False)
    monkeypatch.setattr(tracking._Health, "failures", 0)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("connection refused")

    assert tracking.safe_call("log_metrics", broken, 1) is False
    assert tracking.safe_call("log_metrics", broken, 2) is False
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking at") == 1 and "log_metrics" in err and "ConnectionError" in err
    assert tracking.safe_call("log_artifact", lambda *a: calls.append(a), 3) is True
    assert "answers again" in capsys.readouterr().err
    assert calls == [(1,), (2,), (3,)] and tracking._Health.failures == 2 and not tracking._Health.down


def test_safe_call_skips_a_dead_http_server_without_calling(monkeypatch, capsys):
    from diffusion_core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setattr(tracking._Health, "down", True)
    monkeypatch.setattr(tracking._Health, "failures", 0)
    called = []
    t0 = time.time()
    assert tracking.safe_call("log_batch", lambda: called.append(1)) is False
    assert not called and time.time() - t0 < 5 and tracking._Health.failures == 1


def test_a_batch_whose_answer_was_lost_is_resent_without_doubling_points(tmp_path, monkeypatch):
    """The race behind the restart test, made certain: the server stores a batch and dies before it
    answers, so the logger sees a failure and sends the same points again at the next flush. Points keep
    the time they were recorded, so the store recognises them and the history holds each step once."""
    import mlflow

    from diffusion_core import tracking
    from stages.train import MlflowLogger

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    real = tracking.safe_call
    calls = []

    def stored_but_unanswered(what, fn, *args, **kwargs):
        calls.append(what)
        if len(calls) == 1:
            fn(*args, **kwargs)  # the server stored it ...
            return False  # ... and its answer never came back
        return real(what, fn, *args, **kwargs)

    monkeypatch.setattr(tracking, "safe_call", stored_but_unanswered)
    try:
        with mlflow.start_run() as run:
            logger = MlflowLogger()
            for step in range(1, 21):
                logger.on_step(step, {"loss": 1.0 / step, "lr": 1e-3})
            logger.flush()  # "failed": the 20 points stay in the buffer
            assert len(logger.buffer) == 40
            time.sleep(0.01)  # a resend that re-stamped the points would now differ from the stored ones
            for step in range(21, 41):
                logger.on_step(step, {"loss": 1.0 / step, "lr": 1e-3})
            logger.flush()
            assert logger.buffer == [] and len(calls) == 2
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(m.step for m in history) == list(range(1, 41))


def test_orphaned_runs_are_ended_killed_and_live_or_foreign_ones_left_alone(tmp_path):
    """close_orphans, on a real SQLite store: RUNNING runs whose stage process is gone (here: a
    process that exited) end KILLED with a reason; a live process's run, another host's, a finished
    run and a run without the tags are left as they were."""
    import mlflow

    from diffusion_core.tracking import close_orphans

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        exp = client.create_experiment("orphans")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        host = socket.gethostname()
        try:
            runs = {name: client.create_run(exp, tags=tags).info.run_id for name, tags in {
                "orphan": {"stage_host": host, "stage_pid": str(gone.pid)},
                "live": {"stage_host": host, "stage_pid": str(alive.pid)},
                "other host": {"stage_host": host + "-elsewhere", "stage_pid": str(gone.pid)},
                "untagged": {},
                "finished": {"stage_host": host, "stage_pid": str(gone.pid)},
            }.items()}
            client.set_terminated(runs["finished"])
            assert close_orphans(client, exp) == [runs["orphan"]]
            status = {name: client.get_run(rid).info.status for name, rid in runs.items()}
        finally:
            alive.kill()
            alive.wait()
        assert status == {"orphan": "KILLED", "live": "RUNNING", "other host": "RUNNING", "untagged": "RUNNING", "finished": "FINISHED"}
        assert f"pid {gone.pid}" in client.get_run(runs["orphan"]).data.tags["ended_by"]
    finally:
        mlflow.set_tracking_uri(None)
