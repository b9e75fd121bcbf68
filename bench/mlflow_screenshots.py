"""The MLflow UI as a newcomer sees it: screenshots of the runs table, one run and a comparison of two
runs, taken in headless Chromium, and a check that the runs table names each run, its datasets and its
model.

    python bench/mlflow_screenshots.py [--db mlflow.db] [--out bench/screenshots]

Starts `mlflow ui` on 127.0.0.1 (a free port) on the given database, opens the pages in headless
Chromium (the Debian package `chromium`; `--chromium PATH` for another), saves
``runs-table.png``, ``run.png`` and ``compare.png`` in ``--out``, and exits 1 naming what is missing
when the runs table lacks a run's name, its dataset inputs (``<source>/train``) or its logged model.
The database needs at least two finished pipeline runs (e.g. `dvc repro`, then `dvc exp run -S
sample.guidance_scale=1.5`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "digit-diffusion"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runs_in(db: Path) -> tuple[str, list[dict]]:
    """(experiment id, finished runs newest first: id, name, dataset names) from the database itself."""
    with sqlite3.connect(db) as con:
        row = con.execute("select experiment_id from experiments where name=?", (EXPERIMENT,)).fetchone()
        if row is None:
            raise SystemExit(f"{db}: no experiment {EXPERIMENT!r} (run the pipeline first)")
        exp = str(row[0])
        runs = []
        for run_id, name in con.execute("select run_uuid, name from runs where experiment_id=? and status='FINISHED' "
                                        "order by start_time desc", (row[0],)):
            datasets = [n for (n,) in con.execute("select d.name from inputs i join datasets d on d.dataset_uuid = i.source_id "
                                                   "where i.destination_id=?", (run_id,))]
            # its models as the runs table names them: the registered model and version of each logged model
            models = [f"{n} v{v}" for n, v in con.execute(
                "select m.name, m.version from inputs i join model_versions m on m.source = 'models:/' || i.destination_id "
                "where i.source_id=? and i.source_type='RUN_OUTPUT'", (run_id,))]
            runs.append({"id": run_id, "name": name, "datasets": sorted(set(datasets)), "models": models})
    if len(runs) < 2:
        raise SystemExit(f"{db}: {len(runs)} finished run(s); the comparison needs two (e.g. dvc exp run -S sample.guidance_scale=1.5)")
    return exp, runs


def chromium(binary: str, url: str, *args: str) -> str:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=2000,1000",
           "--virtual-time-budget=20000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, default=REPO / "mlflow.db")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "screenshots")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args()
    if not args.db.is_file():
        raise SystemExit(f"{args.db}: no such database (run the pipeline first)")
    if not shutil.which(args.chromium):
        raise SystemExit(f"--chromium {args.chromium}: not found (apt-get install chromium)")
    exp, runs = runs_in(args.db)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{args.db.resolve()}",
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("mlflow ui did not answer within 120 s")
        a, b = runs[0], runs[1]
        pages = {
            "runs-table.png": f"{base}/#/experiments/{exp}/runs",
            "run.png": f"{base}/#/experiments/{exp}/runs/{a['id']}",
            "compare.png": f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps([a['id'], b['id']]))}"
                           f"&experiments={urllib.parse.quote(json.dumps([exp]))}",
        }
        for name, url in pages.items():
            chromium(args.chromium, url, f"--screenshot={args.out / name}")
            print(f"{args.out / name}: {url}")
        dom = chromium(args.chromium, pages["runs-table.png"], "--dump-dom")
        dom = " ".join(re.sub(r"<[^>]+>", " ", dom).split())  # the page's text
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    missing = [f"run name {r['name']!r}" for r in runs[:2] if r["name"] not in dom]
    missing += [f"dataset {d!r}" for r in runs[:2] for d in r["datasets"][:1] if d not in dom]
    missing += [f"model {m!r}" for r in runs[:2] for m in r["models"][:1] if m not in dom]
    missing += [f"run {r['name']!r} has no dataset inputs" for r in runs[:2] if not r["datasets"]]
    missing += [f"run {r['name']!r} has no registered model" for r in runs[:2] if not r["models"]]
    if missing:
        raise SystemExit("the runs table lacks: " + "; ".join(missing))
    for r in runs[:2]:
        print(f"runs table: {r['name']!r} with datasets {', '.join(r['datasets'])} and model {r['models'][0]}")


if __name__ == "__main__":
    main()
