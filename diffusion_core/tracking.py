"""MLflow tracking for the pipeline: one run per pipeline execution, shared by its stages.

* Where: ``MLFLOW_TRACKING_URI`` if set, else an SQLite database at the repository root
  (``sqlite:///<repo>/mlflow.db``). Runs made by ``dvc exp run`` from the queue execute in a copy
  of the repo under ``<repo>/.dvc/tmp/exps/``; they are pointed back at the original repository's
  database so every run lands in one place.
* Which run: ``train`` starts a run and writes its id to ``models/run.json`` (a DVC out). Each later
  stage reads the run file of the stage before it and continues that run, unless that run already
  went through this stage (a later ``dvc exp run -S sample.guidance_scale=...`` re-runs only
  sampling): then it starts a new run that copies the upstream params, metrics and loss curves,
  so each run in the UI is one complete pipeline execution. The stage writes the id it used to its
  own run file for the next stage.
* Outages: an HTTP server must answer when a stage starts (it fails within seconds otherwise,
  before any work). Once a stage is running, tracking is best effort: every logging call goes
  through :data:`safe` / :func:`safe_call`, and a failure prints one warning and the stage carries
  on, so a tracking server that dies mid-run never costs the trained model or the DVC outs. While
  the server is down, calls are skipped after a quick socket probe (no minutes of HTTP retries);
  when it answers again, logging resumes. The run file records whether tracking was complete.
* Ends: a stage that fails ends its run FAILED; one stopped by Ctrl-C or SIGTERM ends it KILLED.
  A stage killed outright (SIGKILL, a lost machine) cannot: each run records the host and process
  of the stage that holds it open (tags ``stage_host``, ``stage_pid``), and the next stage that
  starts on that host ends any RUNNING run whose process is gone as KILLED (:func:`close_orphans`),
  so no run stays RUNNING for ever.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import subprocess
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from diffusion_core.errors import TrackingError  # noqa: F401 - raised here, caught by the stages

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "digit-diffusion")


def repo_root(start: str | Path | None = None) -> Path:
    """The project root: the original repository even inside a queued DVC experiment's temp copy."""
    here = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def tracking_uri(root: str | Path | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root(root) / 'mlflow.db'}"


def display_uri(root: str | Path | None = None) -> str:
    """The tracking URI as files written into the repository show it: the local default relative to
    the project root (not one machine's absolute path), any other without user or password."""
    uri = tracking_uri(root)
    if uri == f"sqlite:///{repo_root(root) / 'mlflow.db'}":
        return "sqlite:///mlflow.db"
    parsed = urllib.parse.urlparse(uri)
    if parsed.username or parsed.password:
        parsed = parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else ""))
    return parsed.geturl()


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail within seconds, before any work, when an HTTP tracking server does not answer."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri}: tracking server not reachable ({exc.strerror or exc}); "
            "start it, or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        ) from None


# HTTP retry policy of the MLflow client, unless the user set it: a hiccup is retried for about
# 7 s (1 + 2 + 4); a dead server is then detected and skipped (see `safe_call`), instead of the
# client's default of 7 retries with backoff 2 (about 4 minutes of blocking per call).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class _Health:
    """Whether tracking calls of this process have been failing (module-wide state)."""

    down: bool = False
    failures: int = 0  # calls that failed or were skipped since the stage started


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def safe_call(what: str, fn: Callable, *args: Any, **kwargs: Any) -> bool:
    """Call an MLflow function; True if it worked. Never raises.

    The first failure prints one warning naming the tracking URI; while tracking is down, later
    calls first probe an HTTP server's port (a refused connection is instant) and are skipped if it
    does not answer. When a call works again, a second line says logging resumed.
    """
    if _Health.down:
        try:
            check_reachable(tracking_uri(), timeout=2.0)
        except TrackingError:
            _Health.failures += 1
            return False
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - MLflow, requests and sqlite errors alike
        _Health.failures += 1
        if not _Health.down:
            first = (str(exc).splitlines() or [""])[0][:200]
            _warn(
                f"MLflow tracking at {tracking_uri()} failed during {what} ({type(exc).__name__}: {first}); "
                "the stage goes on and writes all its outputs; tracking resumes if the server comes back"
            )
        _Health.down = True
        return False
    if _Health.down:
        _warn(f"MLflow tracking at {tracking_uri()} answers again; logging resumed with {what}")
        _Health.down = False
    return True


class _SafeMlflow:
    """``safe.log_metrics(...)`` is ``mlflow.log_metrics(...)`` through :func:`safe_call`."""

    def __getattr__(self, name: str) -> Callable[..., bool]:
        import mlflow

        fn = getattr(mlflow, name)
        return lambda *args, **kwargs: safe_call(name, fn, *args, **kwargs)


safe = _SafeMlflow()


def setup() -> str:
    """Point MLflow at the tracking URI and experiment; returns the URI."""
    local_default = "MLFLOW_TRACKING_URI" not in os.environ  # read before mlflow sets it
    uri = tracking_uri()
    check_reachable(uri)  # before importing mlflow (seconds on a busy machine)
    import mlflow

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    with _sqlite_init_lock(uri):  # two processes creating one new database would race on its schema
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            # With the local database, artifacts go beside it (not to ./mlruns of whatever folder the
            # stage runs in: a queued experiment's temporary copy would take them away).
            location = (repo_root() / "mlartifacts").as_uri() if local_default else None
            try:
                mlflow.create_experiment(EXPERIMENT, artifact_location=location)
            except Exception:  # noqa: BLE001 - created concurrently by another stage or process
                pass
        mlflow.set_experiment(EXPERIMENT)
        # MLflow 3 opens an experiment in its model-training view only with this tag (else its GenAI view)
        mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")
    return uri


@contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside an SQLite tracking database (no-op for other URIs or without
    fcntl): MLflow creates the schema on first use, and concurrent creators can fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# What decides a run's results besides params.yaml (whose values every run logs): a run made with
# uncommitted changes to these is not reproducible from its git commit alone.
CODE_PATHS = ("stages", "diffusion_core", "dvc.yaml", "pyproject.toml")


def uncommitted_code(root: Path | None = None) -> list[str]:
    """Tracked files under :data:`CODE_PATHS` that differ from the git commit (empty when clean or
    not in a git checkout). The pipeline's own outputs (``dvc.lock``, ``reports/``) are not code."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                             cwd=root or Path.cwd(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line[3:] for line in out.stdout.splitlines() if len(line) > 3) if out.returncode == 0 else []


def run_tags() -> dict[str, str]:
    changed = uncommitted_code()
    tags = {"git_commit": git_commit(), "git_uncommitted_code": ", ".join(changed) or "none", "mlflow.source.name": "dvc pipeline"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def write_run_file(path: str | Path, run_id: str, complete: bool = True) -> None:
    """``complete`` False: some tracking calls of the stage failed (the outs are still whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"run_id": run_id, "tracking_uri": tracking_uri(), "experiment": EXPERIMENT, "tracking_complete": complete}
    path.write_text(json.dumps(info) + "\n")


def read_run_file(path: str | Path) -> str:
    path = Path(path)
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TrackingError(f"{path}: missing or not a run file (run the upstream stage first)") from None


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    items = list(params.items())
    for i in range(0, len(items), 90):  # log_params takes at most 100 at a time
        mlflow.log_params({k: str(v) for k, v in items[i : i + 90]})


# The stages that open MLflow runs, in pipeline order. Every metric a stage logs is named
# "<stage>/...", so a copied run takes exactly what the stages before the copying one made.
STAGES = ("prepare", "train", "sample", "evaluate", "report")
# Stages that log nothing themselves: their params go into the run of the stage named here (the
# train stage logs what prepare read; evaluate, the judge's; report, the sweep's).
LOGGED_WITH = {"prepare": "train", "train_clip": "evaluate", "sweep": "report"}


def dvc_yaml(root: str | Path | None = None) -> Path:
    """The pipeline's dvc.yaml: in the project root, else beside the installed package."""
    for folder in (repo_root(root), Path(__file__).resolve().parents[1]):
        if (folder / "dvc.yaml").is_file():
            return folder / "dvc.yaml"
    raise TrackingError(f"dvc.yaml not found in {repo_root(root)}: run the stages from the project root")


def dvc_params(root: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """Each stage's ``params`` in dvc.yaml (group names such as ``train``, or dotted keys such as
    ``clip.batch_size``): the one stage -> params map that DVC, MLflow and the resume check share."""
    path = dvc_yaml(root)
    return _read_dvc_params(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_dvc_params(path: Path, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    """dvc.yaml parsed once per version of the file (a stage asks for its map several times)."""
    import yaml

    try:
        stages = yaml.safe_load(path.read_text())["stages"]
        return {name: tuple(str(e) for e in spec.get("params", ())) for name, spec in stages.items()}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        raise TrackingError(f"{path}: not a dvc.yaml with stages and their params") from None


def matches(key: str, entries: tuple[str, ...]) -> bool:
    """Whether the dotted ``key`` is one of dvc.yaml's params ``entries`` or inside one of its groups."""
    return any(key == e or key.startswith(e + ".") for e in entries)


def stage_entries(stage: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The params entries an MLflow run logs for ``stage``: its own and those of the stages logged with it."""
    params = dvc_params(root)
    own = [stage, *(s for s, host in LOGGED_WITH.items() if host == stage)]
    return tuple(e for s in own for e in params.get(s, ()))


def stage_params(flat: dict[str, Any], stage: str) -> dict[str, Any]:
    """The values of ``flat`` (``Config.flat()``) that ``stage`` reads by dvc.yaml (:func:`stage_entries`)."""
    entries = stage_entries(stage)
    return {k: v for k, v in flat.items() if matches(k, entries)}


def _stage_done_tag(stage: str) -> str:
    return f"stage.{stage}"


def _earlier(stage: str) -> set[str]:
    return set(STAGES[: STAGES.index(stage)])


def run_name(flat: dict[str, Any]) -> str:
    """A run's name in the MLflow UI: the DVC experiment's name when ``dvc exp run`` made it, else
    what tells runs apart (data, epochs, sampler and steps, guidance) and the commit."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    return (f"{flat['data.source']} {flat['train.epochs']}ep {flat['sample.sampler']}-{flat['sample.steps']} "
            f"w{flat['sample.guidance_scale']:g} {git_commit()[:7]}")


def _copy_run(client, src_id: str, stage: str, name: str | None = None) -> str:
    """A new run holding what the stages before ``stage`` logged to ``src_id``.

    Their params (by dvc.yaml, :func:`stage_entries`), their metric histories (loss curves included), tags and
    dataset inputs are copied, and the trained model is linked as the new run's model too (MLflow's
    runs table shows it in the Models column); the run that trained it stays in the tag ``model_run_id``.
    """
    from mlflow.entities import LoggedModelOutput, Metric, Param

    earlier = _earlier(stage)
    src = client.get_run(src_id)
    tags = {k: v for k, v in src.data.tags.items() if not k.startswith(("mlflow.", "stage."))}
    tags.update({_stage_done_tag(s): "done" for s in earlier if _stage_done_tag(s) in src.data.tags})
    tags.update(run_tags())
    tags["copied_from_run"] = src_id
    tags["model_run_id"] = src.data.tags.get("model_run_id", src_id)
    tags["opened_by_stage"] = stage
    run = client.create_run(src.info.experiment_id, tags=tags, run_name=name or src.info.run_name)
    new_id = run.info.run_id
    entries = tuple(e for s in earlier for e in stage_entries(s))
    params = [Param(k, v) for k, v in src.data.params.items() if matches(k, entries)]
    for i in range(0, len(params), 90):
        client.log_batch(new_id, params=params[i : i + 90])
    for key in src.data.metrics:
        if key.split("/")[0] not in earlier:
            continue
        history = client.get_metric_history(src_id, key)
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in history]
        for i in range(0, len(metrics), 900):
            client.log_batch(new_id, metrics=metrics[i : i + 900])
    if src.inputs.dataset_inputs:
        client.log_inputs(new_id, datasets=src.inputs.dataset_inputs)
    models = [m.model_id for m in (src.outputs.model_outputs if src.outputs else [])]
    if models:
        client.log_outputs(new_id, [LoggedModelOutput(m, 0) for m in dict.fromkeys(models)])
    return new_id


SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def log_splits(data_dir: str | Path, source: str, loaded: dict[str, dict] | None = None) -> bool:
    """Log the prepared splits as the active run's dataset inputs (mlflow.data NumPy datasets named
    ``<source>/<split>``, their source the split's file, the split as context), so the runs table
    shows which data each run saw and runs on other data are told apart. ``loaded``: splits the
    caller already read (the others are read from ``data_dir``). Best effort, like all logging."""
    return safe_call("logging the data splits", _log_splits, data_dir, source, loaded or {})


def _log_splits(data_dir: str | Path, source: str, loaded: dict[str, dict]) -> None:
    import mlflow

    from diffusion_core.data import SPLITS, load_split

    for split in SPLITS:
        path = Path(data_dir) / f"{split}.pt"
        tensors = loaded.get(split) or load_split(data_dir, split)
        dataset = mlflow.data.from_numpy(tensors["images"].numpy(), targets=tensors["labels"].numpy(),
                                         source=str(path.resolve()), name=f"{source}/{split}")
        mlflow.log_input(dataset, context=SPLIT_CONTEXTS[split])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a pid we can test): leave its run alone
    return True


def close_orphans(client, experiment_id: str) -> list[str]:
    """End as KILLED every RUNNING run of the experiment held open by a stage on this host whose
    process is gone (killed outright, so it could not end its run). Returns their ids."""
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.stage_host = '{host}'", max_results=1000):
        pid = run.data.tags.get("stage_pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            client.set_tag(run.info.run_id, "ended_by", f"a later stage: the process that held it open (pid {pid} on {host}) was gone")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


class _Sigterm:
    """While a stage's run is open, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so the run is
    ended KILLED instead of left RUNNING. Only in the main thread, where Python delivers signals."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


@contextmanager
def stage_run(stage: str, upstream_run_file: str | Path | None, own_run_file: str | Path | None, params: dict[str, Any],
              name: str | None = None) -> Iterator[str]:
    """Open the MLflow run this stage belongs to (see the module docstring); yields its id.

    ``params`` are this stage's own params (:func:`stage_params`); ``upstream_run_file`` None
    starts a new run (the train stage). On success the run is tagged
    ``stage.<stage>=done`` and its id written to ``own_run_file``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    setup()
    client = MlflowClient()
    safe_call("closing orphaned runs", close_orphans, client, mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
    if upstream_run_file is None:
        run = client.create_run(mlflow.get_experiment_by_name(EXPERIMENT).experiment_id,
                                tags={**run_tags(), "opened_by_stage": stage}, run_name=name)
        run_id = run.info.run_id
        client.set_tag(run_id, "model_run_id", run_id)
    else:
        run_id = read_run_file(upstream_run_file)
        try:
            upstream = client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - mlflow raises its own exception types
            raise TrackingError(f"{upstream_run_file}: run {run_id} not found in {tracking_uri()} ({type(exc).__name__})") from None
        if _stage_done_tag(stage) in upstream.data.tags:
            run_id = _copy_run(client, run_id, stage, name)
    mlflow.start_run(run_id=run_id)
    _Health.down, _Health.failures = False, 0
    try:
        with _Sigterm():
            safe.set_tags({"stage_host": socket.gethostname(), "stage_pid": str(os.getpid())})
            log_params(params)
            start = time.time()
            yield run_id
    except BaseException as exc:
        safe_call("end_run", mlflow.end_run, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    safe.log_metric(f"{stage}/stage_seconds", time.time() - start)
    safe.set_tag(_stage_done_tag(stage), "done")
    safe_call("end_run", mlflow.end_run)  # pops the local active run first, even if the server is gone
    if own_run_file is not None:
        write_run_file(own_run_file, run_id, complete=_Health.failures == 0)
