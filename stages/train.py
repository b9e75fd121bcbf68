"""Stage 2: train the class-conditional diffusion model.

Outs: ``models/model.pt`` (EMA weights + config), ``models/checkpoint.pt`` (full training state,
persisted so a killed run resumes), ``models/grids/epoch_NNN.png`` (fixed-noise grids after the
first, every ``train.grid_every``-th and the last epoch), ``models/run.json`` (the MLflow run).
Metrics: ``reports/metrics/train.json``. Plots: ``reports/plots/train_loss.csv`` (per step) and
``reports/plots/val_loss.csv`` (per epoch).

Runs unchanged under ``torchrun --nproc_per_node=N -m stages.train`` (data parallel, see
:mod:`diffusion_core.trainer`): every process trains and resumes from the checkpoint; rank 0 alone
opens the MLflow run and writes the outputs.
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import typer

from diffusion_core import tracking
from diffusion_core.config import load_config
from diffusion_core.data import load_split
from diffusion_core.trainer import Trainer
from diffusion_core.unet import count_parameters
from stages._common import one_line_errors, read_json, write_json

app = typer.Typer(add_completion=False)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


class MlflowLogger:
    """Buffers per-step metrics and sends them in batches at each epoch end (cheap on SQLite).

    Each point is stamped when it is recorded, not when it is sent: a batch that reached the server
    but whose answer was lost (the server died mid-request) is sent again unchanged, and MLflow's
    store drops a point it already holds (same key, step, timestamp and value) instead of doubling it.
    """

    def __init__(self) -> None:
        import mlflow

        self.mlflow = mlflow
        self.buffer: list = []  # mlflow.entities.Metric, oldest first

    def add(self, step: int, **values: float) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in values.items()]

    def flush(self) -> None:
        run_id = self.mlflow.active_run().info.run_id
        client = self.mlflow.tracking.MlflowClient()
        while self.buffer:
            if not tracking.safe_call("log_batch", client.log_batch, run_id, metrics=self.buffer[:900]):
                return  # tracking is down: the unsent points stay, the next flush retries them
            del self.buffer[:900]  # (the loss curves are also in reports/plots/*.csv, whatever happens here)

    def on_step(self, step: int, rec: dict) -> None:
        self.add(step, **{"train/loss": rec["loss"], "train/lr": rec["lr"]})

    def on_epoch(self, epoch: int, rec: dict, grid: Path | None) -> None:
        self.add(rec["step"], **{"train/val_loss": rec["val_loss"], "train/epoch": epoch})
        self.flush()
        if grid is not None:
            tracking.safe.log_artifact(str(grid), "grids")


@app.command()
@one_line_errors
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    data: Path = typer.Option(Path("data/prepared"), help="prepared splits (prepare stage)"),
    out: Path = typer.Option(Path("models"), help="output folder"),
    metrics: Path = typer.Option(Path("reports/metrics/train.json"), help="DVC metrics file"),
    plots: Path = typer.Option(Path("reports/plots"), help="folder for the loss-curve CSVs"),
) -> None:
    cfg = load_config(params)
    stats = read_json(data / "stats.json")
    if stats["source"] != cfg.data.source:
        raise tracking.TrackingError(f"{data}/stats.json holds {stats['source']!r} but data.source is {cfg.data.source!r}: run the prepare stage")
    train, val = load_split(data, "train"), load_split(data, "val")
    info = {"channels": stats["channels"], "size": stats["size"], "class_names": stats["class_names"]}
    trainer = Trainer(cfg, train, val, info, out)  # under torchrun: joins the process group
    try:
        resume = False
        if trainer.checkpoint_path.exists():  # every rank reads the same file, so all decide alike
            why = trainer.resume_mismatch()  # raises on an unreadable checkpoint: never overwrite silently
            resume = why is None
            if trainer.is_main:
                typer.echo(f"resuming from {trainer.checkpoint_path}" if resume else f"starting over: {why}")
        if trainer.is_main:
            compiled = f", compiled ({trainer.compile_mode} mode; a machine's first compile takes about a minute)" if trainer.compiled else ""
            typer.echo(f"training on {trainer.device} in {trainer.precision}{compiled}")
            if not resume:
                shutil.rmtree(out / "grids", ignore_errors=True)
            train_and_log(cfg, trainer, stats, data, {"train": train, "val": val}, resume, out, metrics, plots)
        else:  # other ranks: train alongside rank 0, write nothing, log nothing
            if resume:
                trainer.load_checkpoint(trainer.checkpoint_path)
            trainer.fit(resume=False)
    finally:
        trainer.close()


def train_and_log(cfg, trainer: Trainer, stats: dict, data_dir: Path, splits: dict[str, dict], resume: bool, out: Path,
                  metrics: Path, plots: Path) -> None:
    """Rank 0 (or the only process): train inside the MLflow run and write every output (``splits``:
    the prepared splits already read from ``data_dir``)."""
    flat = cfg.flat()
    with tracking.stage_run("train", None, out / "run.json", tracking.stage_params(flat, "train"), tracking.run_name(flat)) as run_id:
        logger = MlflowLogger()
        trainer.on_step, trainer.on_epoch = logger.on_step, logger.on_epoch
        tracking.safe.set_tag("data.source", cfg.data.source)
        tracking.safe.log_dict(stats, "data/stats.json")
        tracking.log_splits(data_dir, cfg.data.source, splits)
        if resume:  # the restored history goes into this run too, so its curves are complete
            trainer.load_checkpoint(trainer.checkpoint_path)
            for r in trainer.history.train:
                logger.on_step(r["step"], r)
            for r in trainer.history.val:
                logger.add(r["step"], **{"train/val_loss": r["val_loss"], "train/epoch": r["epoch"]})
            logger.flush()
        result = trainer.fit(resume=False)  # the state, if any, was restored above
        logger.flush()
        summary = {
            "final_train_loss": result.final_train_loss,
            "final_val_loss": result.final_val_loss,
            "steps": result.steps,
            "epochs": result.epochs,
            "wall_time_s": round(result.wall_time_s, 2),
            "images_per_s": round(result.images_per_s, 2),
            "parameters": count_parameters(trainer.model),
            "device": str(trainer.device),
            "processes": trainer.world,
            "precision": trainer.precision,
            "compiled": trainer.compiled,
            "compile_mode": trainer.compile_mode,
        }
        write_json(metrics, summary)
        write_csv(plots / "train_loss.csv", [{"step": r["step"], "epoch": r["epoch"], "loss": r["loss"], "lr": r["lr"]} for r in result.history.train])
        write_csv(plots / "val_loss.csv", result.history.val)
        tracking.safe.log_metrics({f"train/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        from diffusion_core import mlflow_model  # imports mlflow: only once the run is open

        mlflow_model.log_and_register(out / "model.pt", stats["class_names"], (stats["channels"], stats["size"], stats["size"]))
        tracking.safe.log_artifact(str(metrics), "metrics")
        where = f" on {trainer.world} processes" if trainer.world > 1 else ""
        typer.echo(
            f"trained {result.steps} steps{where} in {result.wall_time_s:.0f}s ({result.images_per_s:.0f} img/s); "
            f"val loss {result.final_val_loss:.4f}; MLflow run {run_id}"
        )


if __name__ == "__main__":
    app()
