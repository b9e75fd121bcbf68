"""End to end: the real pipeline with `dvc repro` in a temporary copy of the repo, tiny params."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_params import write_tiny_params

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd, cwd, check=True, env=None):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of the project (tracked and untracked-not-ignored files) with tiny params."""
    dst = tmp_path_factory.mktemp("pipeline") / "repo"
    files = run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.split()
    for f in files:
        if f.startswith(("tests/", "reports/", "bench/")) or f == "dvc.lock" or not (REPO / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    write_tiny_params(REPO / "params.yaml", dst / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(dst)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "init", "-q"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "init"], dst)
    first = run(["dvc", "repro"], dst, env=env)
    return dst, env, first


def test_runs_from_uncommitted_code_are_flagged(tmp_path):
    from diffusion_core.tracking import uncommitted_code
    from stages.report import commit_text

    assert uncommitted_code(tmp_path) == []  # not a git checkout
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.lock").write_text("a\n")
    run(["git", "init", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "init"], tmp_path)
    assert uncommitted_code(tmp_path) == []
    (tmp_path / "params.yaml").write_text("seed: 1\n")  # params are logged with every run; outputs are not code
    (tmp_path / "dvc.lock").write_text("b\n")
    assert uncommitted_code(tmp_path) == []
    (tmp_path / "stages" / "train.py").write_text("x = 2\n")
    assert uncommitted_code(tmp_path) == ["stages/train.py"]
    assert commit_text("abc", ["stages/train.py"]) == "`abc` with uncommitted changes to `stages/train.py`"
    assert commit_text("abc", []) == "`abc`"


def mlflow_runs(db: Path):
    con = sqlite3.connect(db)
    try:
        return con.execute("select run_uuid from runs order by start_time").fetchall(), con
    except sqlite3.Error:
        con.close()
        raise


def test_repro_produces_every_out_and_one_mlflow_run(repo):
    dst, env, first = repo
    for out in [
        "data/prepared/train.pt", "data/prepared/stats.json", "models/model.pt", "models/checkpoint.pt",
        "models/grids/epoch_001.png", "models/run.json", "models/digit-clip.pt", "samples/samples.npz",
        "samples/grid.png", "samples/trajectory.npz", "evaluation/digit-clip/per_class.csv",
        "evaluation/digit-clip/recognizability.csv", "sweep/results.csv", "reports/report.md",
        "reports/runs.md", "reports/metrics/train.json", "reports/metrics/evaluate.json",
        "reports/plots/train_loss.csv", "reports/figures/loss.png",
    ]:
        assert (dst / out).is_file(), out
    import numpy as np

    with np.load(dst / "samples/samples.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (40, 28, 28)
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == sorted(f["labels"].tolist())
    import pandas as pd

    sweep = pd.read_csv(dst / "sweep/results.csv")
    assert len(sweep) == 5 and sweep["images"].eq(20).all()
    both = sweep[(sweep["sampler"] == "dpm++2m") & (sweep["steps"] == 5) & (sweep["guidance_scale"] == 1.0)]
    assert both["sweep"].tolist() == ["guidance", "sampler"]  # one draw, reported in both sweeps
    assert both.drop(columns="sweep").nunique().eq(1).all()
    runs, con = mlflow_runs(dst / "mlflow.db")
    try:
        assert len(runs) == 1
        run_id = runs[0][0]
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
        import yaml

        sampler = yaml.safe_load((dst / "params.yaml").read_text())["sample"]["sampler"]
        assert params["train.epochs"] == "2" and params["sample.sampler"] == sampler and params["clip.models"] == "['digit-clip']"
        metrics = {k for (k,) in con.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
        assert {"train/loss", "train/val_loss", "sample/seconds_per_image", "evaluate/digit-clip/accuracy_generated"} <= metrics
        n_loss = con.execute("select count(*) from metrics where run_uuid=? and key='train/loss'", (run_id,)).fetchone()[0]
        assert n_loss == 20  # one point per step
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
        assert tags["stage.report"] == "done" and len(tags["git_commit"]) == 40
        # told apart at a glance in the MLflow UI: a name, a two-line description, the model-training view
        name = con.execute("select name from runs where run_uuid=?", (run_id,)).fetchone()[0]
        assert name == f"mnist-5k 2ep {sampler}-5 w1 {tags['git_commit'][:7]}", name
        what, numbers = tags["mlflow.note.content"].splitlines()
        assert what.startswith("mnist-5k, 20 steps (2 epochs);") and numbers.startswith("digit-clip: ") and "FD" in numbers
        assert tags["opened_by_stage"] == "train"
        kind = con.execute("select value from experiment_tags where key='mlflow.experimentKind'").fetchone()
        assert kind == ("custom_model_development",)
        assert tags["git_uncommitted_code"] == "none"  # the copy's code is committed
        # the splits it saw, as MLflow dataset inputs: name, digest, the split as context
        inputs = con.execute("select d.name, d.digest, d.dataset_source, t.value from inputs i join datasets d on d.dataset_uuid = i.source_id "
                             "join input_tags t on t.input_uuid = i.input_uuid where i.destination_id=? and t.name='mlflow.data.context'",
                             (run_id,)).fetchall()
        assert sorted((n, c) for n, _, _, c in inputs) == [("mnist-5k/test", "testing"), ("mnist-5k/train", "training"), ("mnist-5k/val", "validation")]
        assert len({d for _, d, _, _ in inputs}) == 3 and all("data/prepared/" in src for _, _, src, _ in inputs)
    finally:
        con.close()
    # artifacts live beside the database, whatever folder a stage ran in
    tables = list((dst / "mlartifacts").rglob("per_class.json"))
    assert tables and not (dst / "mlruns").exists()
    assert list((dst / "mlartifacts").rglob("model.pt")) and list((dst / "mlartifacts").rglob("report.md"))


def test_repro_again_has_nothing_to_do(repo):
    dst, env, _ = repo
    res = run(["dvc", "status"], dst, env=env)
    assert "up to date" in res.stdout, res.stdout


def test_changing_guidance_reruns_only_sampling_and_later_and_makes_a_new_run(repo):
    dst, env, _ = repo
    res = run(["dvc", "exp", "run", "-S", "sample.guidance_scale=1.5"], dst, env=env)  # the default is 1.0
    ran = [line.split("'")[1] for line in res.stdout.splitlines() if line.startswith("Running stage")]
    assert set(ran) == {"sample", "evaluate", "sweep", "report"}, res.stdout
    runs, con = mlflow_runs(dst / "mlflow.db")
    try:
        assert len(runs) == 2
        new = runs[-1][0]
        params = dict(con.execute("select key, value from params where run_uuid=?", (new,)).fetchall())
        assert params["sample.guidance_scale"] == "1.5" and params["train.epochs"] == "2"
        n_loss = con.execute("select count(*) from metrics where run_uuid=? and key='train/loss'", (new,)).fetchone()[0]
        assert n_loss == 20  # the loss curve travels with the copied run
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (new,)).fetchall())
        assert tags["copied_from_run"] == runs[0][0] and tags.get("dvc_exp_name")
        datasets = con.execute("select count(*) from inputs where destination_id=? and source_type='DATASET'", (new,)).fetchone()[0]
        models = con.execute("select count(*) from inputs where source_id=? and source_type='RUN_OUTPUT'", (new,)).fetchone()[0]
        assert (datasets, models) == (3, 1)  # the copied run names the data and the model it used
    finally:
        con.close()


def test_the_champion_model_loads_through_pyfunc_and_answers_rest_requests(repo):
    """The train stage registered its MLflow Model, evaluate put the champion alias on it; it draws in
    process through pyfunc and over REST from a real `mlflow models serve`; bad requests get a 400."""
    import json
    import socket
    import time
    import urllib.error
    import urllib.request

    import mlflow
    import numpy as np
    import pandas as pd

    dst, env, _ = repo
    uri = f"sqlite:///{dst / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient()
        champion = client.get_model_version_by_alias("digit-diffusion", "champion")
        runs, con = mlflow_runs(dst / "mlflow.db")
        con.close()
        assert str(champion.version) == "1" and champion.run_id == runs[0][0]  # trained once; both runs judged it
        assert 0 <= float(champion.tags["judged_accuracy"]) <= 1 and champion.tags["judged_by"] == "digit-clip"
        model = mlflow.pyfunc.load_model("models:/digit-diffusion@champion")
        request = pd.DataFrame({"class": ["seven", "3", "Seven"], "seed": [0, 0, 0]})
        images = model.predict(request)
        assert images.shape == (3, 1, 28, 28) and images.dtype == np.uint8
        assert not np.array_equal(images[0], images[2])  # rows sharing a seed are one batch: two different sevens
        assert np.array_equal(model.predict(request), images)  # the same request, the same images
        assert np.array_equal(model.predict(request.iloc[:1]), images[:1])  # the first row of a seed's batch alone
        with pytest.raises(mlflow.exceptions.MlflowException, match=r"row 0: 'steps' must be an integer in \[1, 100\], got 0"):
            model.predict(pd.DataFrame({"class": ["1"], "steps": [0]}))
    finally:
        mlflow.set_tracking_uri(None)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_env = {**env, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/digit-diffusion@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)], cwd=dst, env=serve_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def post(records):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps({"dataframe_records": records}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert server.poll() is None, server.stderr.read()[-3000:]
        status, body = post([{"class": "7"}])
        assert status == 200, body
        assert np.asarray(body["predictions"]).shape == (1, 1, 28, 28) and np.asarray(body["predictions"]).max() > 0
        assert np.array_equal(np.asarray(body["predictions"], dtype=np.uint8), images[:1])  # the same seven as in process
        for bad, field in (({"class": "unicorn"}, "'class'"), ({"class": "7", "guidance": -1.0}, "'guidance' must be a number >= 0"),
                           ({"class": "7", "sampler": "euler"}, "'sampler' must be one of ddpm, ddim, dpm++2m")):
            status, body = post([{"class": "1"}, bad])
            assert status == 400 and f"row 1: {field}" in body["message"], body
        status, body = post([{"class": "seven", "sampler": "ddim", "steps": 4, "guidance": 2.0}])  # still serving
        assert status == 200 and np.asarray(body["predictions"]).shape == (1, 1, 28, 28)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_draw_a_digit_on_request(repo):
    dst, env, _ = repo
    res = run([sys.executable, "-m", "stages.sample", "--digit", "7", "--count", "4", "--guidance", "2", "--out", "sevens.png"], dst, env=env)
    assert "drew 4 x 'seven'" in res.stdout
    from PIL import Image

    assert Image.open(dst / "sevens.png").size[0] > 28
    bad = run([sys.executable, "-m", "stages.sample", "--digit", "12", "--out", "x.png"], dst, check=False, env=env)
    assert bad.returncode == 2 and "--digit must be in [0, 9]" in bad.stderr
    assert not (dst / "x.png").exists()


def test_report_has_every_section_and_figure_and_its_numbers_come_from_the_metrics(repo):
    import json
    import re

    dst, env, _ = repo
    report = (dst / "reports/report.md").read_text()
    for n, title in enumerate(["Run summary", "Forward diffusion", "Reverse diffusion", "Model", "Training",
                               "CLIP evaluation", "Samples", "Guidance and samplers", "Limitations"], start=1):
        assert f"## {n}. {title}" in report
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) >= 10
    for fig in figures:
        assert (dst / "reports" / fig).is_file(), fig
    train = json.loads((dst / "reports/metrics/train.json").read_text())
    ev = json.loads((dst / "reports/metrics/evaluate.json").read_text())["digit-clip"]
    sample = json.loads((dst / "reports/metrics/sample.json").read_text())
    assert f"validation loss (EMA weights, fixed noise) {train['final_val_loss']:.4f}" in report
    assert f"{train['steps']} steps" in report
    # the loss is explained for the target the network was trained on (params.yaml: v-prediction)
    assert yaml.safe_load((dst / "params.yaml").read_text())["diffusion"]["prediction"] == "v"
    assert "mean squared error between the velocity v" in report and "predicts v" in report
    assert "The network v_θ(x_t, t, y)" in report
    assert f"accuracy {ev['accuracy_generated']:.1%} on {ev['n_generated']} generated digits" in report
    assert f"{ev['frechet_distance']:.4f}" in report
    assert f"{sample['seconds_per_image'] * 1000:.1f} ms per image" in report
    # 5 steps of T = 100 visit t/T = 1, 0.8, 0.6, 0.39, 0.19: guidance inside [0, 0.5] doubles 2 of them
    assert sample["guidance_interval"] == [0.0, 0.5] and sample["guided_steps"] == 2
    assert sample["network_evaluations_per_image"] == 7
    assert f"guidance w={sample['guidance_scale']} at the 2 of 5 steps with t/T in [0, 0.5]" in report
    assert sample["timestep_spacing"] == "trailing" and "dpm++2m, 5 steps, guidance" in report
    run_id = json.loads((dst / "evaluation/run.json").read_text())["run_id"]
    assert run_id in report
    assert "| git commit | `" in report and "uncommitted changes" not in report
    # the easiest/hardest paragraph is filled from the ranking table
    import pandas as pd

    ranking = pd.read_csv(dst / "evaluation/digit-clip/ranking.csv")
    assert f"The best digit, {ranking.iloc[0]['name']}" in report
    assert f"the worst, {ranking.iloc[-1]['name']}" in report
    assert "| run |" in (dst / "reports/runs.md").read_text()


# wall-clock measurements: the only metrics allowed to differ between two executions
TIMING_KEYS = {"wall_time_s", "images_per_s", "seconds", "seconds_per_image", "train_seconds", "stage_seconds"}


def snapshot(dst: Path) -> dict:
    """Every metric (timings dropped) and the bytes of every sample, model and evaluation table."""
    import hashlib
    import json

    import pandas as pd
    import torch

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
        return obj

    snap = {f.name: strip(json.loads(f.read_text())) for f in sorted((dst / "reports/metrics").glob("*.json"))}
    for rel in ["samples/samples.npz", "samples/trajectory.npz", "data/prepared/train.pt",
                *(str(p.relative_to(dst)) for p in sorted((dst / "evaluation").rglob("*.csv")))]:
        snap[rel] = hashlib.sha256((dst / rel).read_bytes()).hexdigest()
    for rel in ["models/model.pt", "models/digit-clip.pt"]:  # weights (the files also hold timings)
        state = torch.load(dst / rel, weights_only=True)["model"]
        snap[rel] = hashlib.sha256(b"".join(t.numpy().tobytes() for t in state.values())).hexdigest()
    snap["sweep"] = pd.read_csv(dst / "sweep/results.csv").drop(columns=["seconds_per_image"]).to_dict("list")
    snap["train_loss.csv"] = (dst / "reports/plots/train_loss.csv").read_text()
    return snap


def test_repro_force_from_scratch_gives_identical_metrics_and_samples(repo):
    """Seeds come from params.yaml only: executing every stage again, training from scratch (the
    persisted checkpoint removed), reproduces every metric and sample exactly on CPU."""
    dst, env, _ = repo
    before = snapshot(dst)
    (dst / "models/checkpoint.pt").unlink()
    res = run(["dvc", "repro", "--force"], dst, env=env)
    ran = {line.split("'")[1] for line in res.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"prepare", "train", "train_clip", "sample", "evaluate", "sweep", "report"}, res.stdout
    assert "resuming" not in res.stdout
    after = snapshot(dst)
    assert after.keys() == before.keys()
    for key in before:
        assert after[key] == before[key], key


def test_two_queued_experiments_run_in_parallel_into_one_database_and_their_plots_compare(repo):
    """`dvc exp run --queue` twice, then `--run-all -j 2`: both experiments complete, each is one
    finished MLflow run in the repository's mlflow.db (not in the queue's temporary copies), no run is
    left RUNNING, and `dvc plots diff` draws their per-class accuracy, recognizability and sweep side by side."""
    import json

    dst, env, _ = repo
    runs, con = mlflow_runs(dst / "mlflow.db")
    con.close()
    before = {r[0] for r in runs}
    for w in ("0.5", "2.5"):
        run(["dvc", "exp", "run", "--queue", "-n", f"w{w.replace('.', '')}", "-S", f"sample.guidance_scale={w}"], dst, env=env)
    run(["dvc", "exp", "run", "--run-all", "-j", "2"], dst, env=env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], dst, env=env).stdout)
    names = {e["name"]: e for base in shown for e in (base.get("experiments") or []) for e in [e["revs"][0]] if e.get("name")}
    assert {"w05", "w25"} <= set(names), sorted(names)
    for n in ("w05", "w25"):  # each with its own judged metrics
        assert names[n].get("error") is None and names[n]["data"]["metrics"]["reports/metrics/evaluate.json"]["data"], names[n]

    runs, con = mlflow_runs(dst / "mlflow.db")
    try:
        new = [r for r in runs if r[0] not in before]
        assert len(new) == 2
        for run_id, *_ in new:
            tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
            assert tags["stage.report"] == "done" and tags["dvc_exp_name"] in ("w05", "w25")
        statuses = {s for (s,) in con.execute("select status from runs")}
        assert "RUNNING" not in statuses, statuses
    finally:
        con.close()
    assert not list(dst.glob(".dvc/tmp/exps/**/mlflow.db"))

    diff = json.loads(run(["dvc", "plots", "diff", "w05", "w25", "--json"], dst, env=env).stdout)
    for plot in ("per_class_accuracy_generated", "recognizability", "guidance_sweep_accuracy", "guidance_sweep_fd"):
        revs = {rev for d in diff["data"][plot] for rev in d["revisions"]}
        assert revs == {"w05", "w25"}, (plot, revs)
