"""Stage 5: write ``reports/report.md`` with its figures, and ``reports/runs.md`` (all runs).

Every number in the report is read from this run's metrics and tables; the report and the runs
index are logged to the run's MLflow artifacts.

Reads ``params.yaml``, ``reports/metrics/{train,train_clip,sample,evaluate}.json``,
``reports/plots/{train,val}_loss.csv``, ``data/prepared`` (stats and the test split),
``models/model.pt``, ``models/grids/epoch_*.png``, ``samples/grid.png``,
``samples/trajectory.npz``, ``evaluation/<judge>/*.csv``, ``sweep/results.csv`` and the MLflow
tracking database; writes ``reports/report.md``, ``reports/figures/*.png`` and ``reports/runs.md``.

``main`` is glue: it loads the inputs and joins the markdown lines of one ``section_*`` function
per report section; each section takes already loaded data (or paths), writes its own figures to
``fig_dir`` and returns its lines, so that it can be called alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from diffusion_core import report as R
from diffusion_core import tracking
from diffusion_core.checkpoint import load_model
from diffusion_core.clip_judge import TRAINED_ENTRIES, class_prompts, slug  # open_clip is imported lazily there, never here
from diffusion_core.config import load_config
from diffusion_core.data import DATASETS, dataset_prompts, load_split, to_model_range
from diffusion_core.unet import count_parameters
from stages._common import one_line_errors, read_json

app = typer.Typer(add_completion=False)

# how a residual block takes the time + class embedding (model.conditioning), for section 4
CONDITIONING_TEXT = {
    "add": "through a linear projection added to its feature maps",
    "silu_add": "through SiLU and a linear projection added to its feature maps",
    "scale_shift": "through SiLU and a linear projection to a per-channel scale and shift of its normalised feature "
    "maps, h = GroupNorm(h)(1 + scale) + shift (ADM's scale-shift norm)",
}
RUN_COLUMNS = {
    "tags.dvc_exp_name": "dvc exp",
    "params.data.source": "data",
    "params.train.epochs": "epochs",
    "params.model.base_channels": "width",
    "params.sample.sampler": "sampler",
    "params.sample.steps": "steps",
    "params.sample.timestep_spacing": "spacing",
    "params.sample.guidance_scale": "guidance",
    "params.sample.guidance_interval": "guided t/T",
    "metrics.train/final_val_loss": "val loss",
    "metrics.train/wall_time_s": "train s",
    "metrics.evaluate/digit-clip/accuracy_generated": "accuracy",
    "metrics.evaluate/digit-clip/worst_class_accuracy": "worst class",
    "metrics.evaluate/digit-clip/frechet_distance": "FD",
    "metrics.sample/seconds_per_image": "s/image",
}


def commit_text(commit: str, changed: list[str]) -> str:
    """The git commit, flagged when the code differs from it (the run is then not reproducible from it)."""
    return f"`{commit}`" + (f" with uncommitted changes to {', '.join(f'`{c}`' for c in changed)}" if changed else "")


def steps_text(m_sample: dict) -> str:
    """'10 steps', or '10 steps (logsnr spacing)' when the sampler did not visit evenly spaced timesteps."""
    spacing = m_sample.get("timestep_spacing", "trailing")
    return f"{m_sample['steps']} steps" + ("" if spacing in ("trailing", "every") else f" ({spacing} spacing)")


def guidance_text(m_sample: dict) -> str:
    """'guidance w=2.0 at the 5 of 10 steps with t/T in [0, 0.5] ...' from the sample stage's metrics."""
    lo, hi = m_sample.get("guidance_interval", [0.0, 1.0])
    w = f"guidance w={m_sample['guidance_scale']}"
    if (lo, hi) == (0.0, 1.0):
        return f"{w} at every step"
    return f"{w} at the {m_sample['guided_steps']} of {m_sample['steps']} steps with t/T in [{lo:g}, {hi:g}], the conditional model alone at the others"


def dataset_words(stats: dict) -> tuple[str, str]:
    """(noun, title) of the prepared dataset: its stats, else its :data:`DATASETS` entry, else digits."""
    spec = DATASETS.get(stats["source"])
    noun = stats.get("noun") or (spec.noun if spec else "digit")
    title = stats.get("title") or (spec.title if spec else "handwritten digits")
    return noun, title


def read_csv_if(path: Path) -> pd.DataFrame | None:
    """The table at ``path``, or None when there is none (an optional input)."""
    return pd.read_csv(path) if path.is_file() else None


def load_trajectory(path: Path) -> dict[str, np.ndarray] | None:
    """The sample stage's reverse-process record (fraction, x_t, x0, labels), or None."""
    if not path.is_file():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in ("fraction", "x_t", "x0", "labels")}


# ---------------------------------------------------------------------------------------------
# One function per report section: plain inputs in, markdown lines out (figures to fig_dir).
# ---------------------------------------------------------------------------------------------


def section_title(title: str, run_id: str) -> list[str]:
    """The report's title and where it comes from."""
    return [
        f"# Class-conditional diffusion on {title}: run report\n",
        f"Generated by `python -m stages.report` from the files of one pipeline run (MLflow run `{run_id}`).\n",
    ]


def section_summary(stats: dict, mcfg, n_params: int, m_train: dict, m_sample: dict, judge: str, head: dict,
                    run_id: str, commit: str, noun: str) -> list[str]:
    """1. Run summary: one table of the run's settings and headline numbers (``head``: the first judge's metrics)."""
    s = stats["splits"]
    summary = pd.DataFrame(
        [
            ("dataset", f"{stats['source']}: {stats['description']} ({s['train']['total']} train / {s['val']['total']} val / {s['test']['total']} test)"),
            ("image size", f"{stats['channels']}x{stats['size']}x{stats['size']}"),
            ("model", f"U-Net, {n_params:,} parameters"),
            ("diffusion", f"T={mcfg.diffusion.timesteps}, {mcfg.diffusion.schedule} schedule, predicts {mcfg.diffusion.prediction}"),
            ("training", f"{m_train['steps']} steps ({m_train['epochs']} epochs, batch {mcfg.train.batch_size}) in {m_train['wall_time_s']:.0f} s on {m_train['device']} ({m_train['images_per_s']:.0f} images/s)"),
            ("sampler", f"{m_sample['sampler']}, {steps_text(m_sample)}, {guidance_text(m_sample)}"),
            ("final validation loss", f"{m_train['final_val_loss']:.4f}"),
            (f"judged accuracy ({judge})", f"{head['accuracy_generated']:.1%} generated vs {head['accuracy_real']:.1%} real"),
            (f"worst {R.words(noun)['cls']}", f"{head['worst_class']} ({head['worst_class_accuracy']:.1%})"),
            ("MLflow run", f"`{run_id}`"),
            ("git commit", commit),
        ],
        columns=["", "value"],
    )
    return ["## 1. Run summary\n", R.md_table(summary) + "\n"]


def section_forward(x0, diffusion, schedule: str, noun: str, fig_dir: Path, seed: int) -> list[str]:
    """2. Forward diffusion: one real image ``x0`` [C, H, W] noised to a few timesteps (figure forward.png)."""
    R.forward_strip(x0, diffusion, R.forward_timesteps(diffusion.timesteps), fig_dir / "forward.png", seed)
    return [
        "## 2. Forward diffusion\n",
        f"A real test {R.words(noun)['item']} noised with q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) under the run's "
        f"{schedule} schedule. ᾱ_t is the share of the signal's variance left; SNR = ᾱ_t/(1-ᾱ_t). "
        "Noise is added in many small steps so that each reverse step is a small, learnable denoising problem.\n",
        "![forward diffusion](figures/forward.png)\n",
    ]


def section_reverse(traj: dict | None, names: list[str], noun: str, fig_dir: Path) -> list[str]:
    """3. Reverse diffusion, its strips: x_t and the predicted x0 per class along the process (when recorded)."""
    md = [f"## 3. Reverse diffusion: when do {R.words(noun)['items']} become recognizable?\n"]
    if traj is not None:
        R.reverse_strips(traj, names, "x_t", fig_dir / "reverse_xt.png")
        R.reverse_strips(traj, names, "x0", fig_dir / "reverse_x0.png")
        md += ["![reverse process, x_t](figures/reverse_xt.png)\n", "![reverse process, predicted x0](figures/reverse_x0.png)\n"]
    return md


def section_recognizability(curve: pd.DataFrame | None, cross: pd.DataFrame, traj: dict | None, names: list[str],
                            judge: str, head: dict, v_pred: bool, sqrt_alpha_bar_T: float, noun: str,
                            fig_dir: Path) -> list[str]:
    """3. (cont.) When the judge recognizes the class along the reverse process: the first judge's
    ``recognizability_curve.csv`` (``curve``; None: not judged, no lines) and crossings (``cross``),
    the whole set's crossings from ``head``; ``traj`` must be recorded when ``curve`` is given."""
    if curve is None:
        return []
    w = R.words(noun)
    item, items = w["item"], w["items"]
    R.recognizability_plot(curve, cross, fig_dir / "recognizability.png")
    n_traj = len(traj["labels"]) if traj is not None else 0
    why = (
        f"With v-prediction the network's x̂_0 at pure noise is its estimate of the average {item} of the requested "
        f"class (there v = −x_0), so x̂_0 can name the class from the first step; x_t shows when the individual "
        f"{item} takes shape.\n"
        if v_pred else
        f"With ε-prediction x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t divides by √ᾱ_t ≈ {sqrt_alpha_bar_T:.3f} "
        f"at pure noise, so the early x̂_0 are dominated by amplified noise.\n"
    )
    return [
        f"The judge ({judge}) classified {n_traj} {items} at each recorded point of the reverse process, "
        f"both the state x_t (clipped to the image range) and the network's prediction of the clean image x̂_0. "
        f"Over all {items}, the predicted x̂_0 is judged correct for at least 50% of {items} from "
        f"{R.pct(head['recognizable_50_x0'])} of the process on, and for 90% from {R.pct(head['recognizable_90_x0'])}; "
        f"the noisy state x_t itself passes 50% from {R.pct(head['recognizable_50_xt'])} and 90% from "
        f"{R.pct(head['recognizable_90_xt'])} (resolution: one recorded point per "
        f"{1 / (len(traj['fraction']) - 1):.0%}). " + why,
        "![recognizability](figures/recognizability.png)\n",
        f"Share of the reverse process from which each {w['cls']} is judged correctly for at least 50% / 90% of its "
        f"samples, with at least that share of the samples judged as it being it (precision, so that the judge's "
        f"default guess for noise does not count as recognized), until the end (n/a: not within the process):\n",
        R.md_table(R.crossing_table(cross, names), ".1f") + "\n",
    ]


def section_model(model, mcfg, n_classes: int) -> list[str]:
    """4. Model: how the network is built, and its layer table (``model.describe()``)."""
    v_pred = mcfg.diffusion.prediction == "v"
    side = model.resolutions[-1]
    return [
        "## 4. Model\n",
        f"The network {'v_θ' if v_pred else 'ε_θ'}(x_t, t, y) built from `params.yaml` (`model` group): {count_parameters(model):,} parameters. "
        f"Sinusoidal time embeddings and a learned class embedding ({n_classes} classes + 1 null class for guidance) "
        f"are summed, and every residual block takes the sum {CONDITIONING_TEXT[mcfg.model.conditioning]}; decoder blocks concatenate the encoder's "
        f"feature maps (skip connections); self-attention sits in the middle block ({side}x{side})"
        + (f" and in the blocks at {mcfg.model.attention_resolutions}" if mcfg.model.attention_resolutions else "")
        + ".\n",
        R.md_table(pd.DataFrame(model.describe()), ".0f") + "\n",
    ]


def loss_text(dcfg, item: str) -> str:
    """What the training loss is, for the run's diffusion settings ``dcfg`` (``mcfg.diffusion``)."""
    if dcfg.prediction == "v":
        what = (
            f"The loss is the mean squared error between the velocity v = √ᾱ_t ε − √(1−ᾱ_t) x_0 of a training {item} "
            "(ε the noise that was added to it) and the network's prediction of v from x_t, at a random timestep. "
            "v is the noise at low t and minus the clean image at high t, so one target of unit scale covers both ends "
            f"and the network's clean-image estimate stays accurate where little of the {item} is left. Lower means the "
            f"network recovers the noise, and hence the {item}, better."
        )
    else:
        what = (
            f"The loss is the mean squared error between the noise ε that was added to a training {item} and the "
            "network's prediction of it from x_t, at a random timestep: lower means the network recovers the noise, and "
            f"hence the {item}, better."
        )
    if dcfg.loss_weighting == "min_snr":
        what += (f" Each sample's loss is weighted by min-SNR-γ (γ = {dcfg.min_snr_gamma:g}) in training; "
                 "the validation loss is the unweighted error.")
    if dcfg.t_sampling == "logit_normal":
        what += (f" Training draws its timesteps with t/T = sigmoid(n), n ~ N({dcfg.t_logit_mean:g}, {dcfg.t_logit_std:g}²), "
                 "so most steps go to the middle noise levels and the training loss is their average; the validation "
                 "loss draws t uniformly, so the two curves are on different scales.")
    elif dcfg.t_sampling == "stratified":
        what += " Training draws one timestep in each of as many equal slices of [0, T) as the batch has images."
    return what


def noise_level_text(by_t: pd.DataFrame, v_pred: bool, item: str) -> str:
    """Which timestep bin of ``by_t`` (columns timesteps, val_loss) is hardest and easiest, and why."""
    hardest, easiest = int(by_t["val_loss"].idxmax()), int(by_t["val_loss"].idxmin())
    low_t = hardest < len(by_t) / 2
    if low_t and v_pred:
        why = "there the noise is small and the target v is mostly that noise, hardest to predict exactly from a nearly clean image"
    elif low_t:
        why = ("there the noise is small and predicting it exactly from a nearly clean image is hardest, while at "
               "high t the input is almost all noise and ε is easy to read off")
    elif v_pred:
        why = (f"there little of the {item} is left and v is mostly the clean {item}, which the network has to infer "
               "from its class and the faint trace in x_t")
    else:
        why = f"there little of the {item} is left, so telling the noise from the {item} is hardest"
    return (
        f"By noise level, the validation loss is highest for t in {by_t.iloc[hardest]['timesteps']} "
        f"({by_t.iloc[hardest]['val_loss']:.4f}) and lowest for t in {by_t.iloc[easiest]['timesteps']} "
        f"({by_t['val_loss'].min():.4f}): {why}.\n"
    )


def section_training(train_df: pd.DataFrame, val_df: pd.DataFrame, m_train: dict, mcfg, timesteps: int,
                     grids: list[Path], log_scale: bool, noun: str, fig_dir: Path) -> list[str]:
    """5. Training: loss curves, validation loss by noise level, fixed-noise grids per epoch (``grids``)."""
    item = R.words(noun)["item"]
    v_pred = mcfg.diffusion.prediction == "v"
    R.loss_curves(train_df, val_df, fig_dir / "loss.png", log_scale, "velocity-prediction MSE" if v_pred else "noise-prediction MSE")
    _, by_t = R.val_by_timestep(val_df, timesteps, fig_dir / "val_by_timestep.png")
    md = [
        "## 5. Training\n",
        f"{loss_text(mcfg.diffusion, item)} Final training loss (mean of the last epoch) {m_train['final_train_loss']:.4f}, "
        f"validation loss (EMA weights, fixed noise) {m_train['final_val_loss']:.4f}.\n",
        "![loss curves](figures/loss.png)\n",
        noise_level_text(by_t, v_pred, item),
        "![validation loss by timestep](figures/val_by_timestep.png)\n",
    ]
    if grids:
        R.epoch_grids(grids, fig_dir / "epoch_grids.png")
        md.append("![samples per epoch](figures/epoch_grids.png)\n")
    return md


def section_clip(judges: list[str], m_eval: dict, m_clip: dict, eval_dir: Path, prompt_names: list[str],
                 templates: tuple[str, ...], noun: str, fig_dir: Path) -> list[str]:
    """6. CLIP evaluation: how the judges score, then one subsection per judge from ``eval_dir/<slug>``."""
    w = R.words(noun)
    items = w["items"]
    md = [
        "## 6. CLIP evaluation\n",
        "CLIP score = 100 · max(cos(image, prompt), 0) (the torchmetrics convention), averaged over the "
        f"{len(templates)} prompt templates of the requested class. Zero-shot accuracy: the class whose prompts score "
        f"highest is the requested one. Real held-out {items}, judged the same way, are the ceiling a judge can "
        + f"reach. {w['judge']} is a small CLIP trained by the pipeline "
        + ("" if noun == "digit" else f"on this dataset's {items} and captions ")
        + f"(zero-shot accuracy on real test {items} {m_clip['zero_shot_accuracy_test']:.1%})."
        + ("" if noun == "digit" else f" The prompts of the first class: {', '.join(repr(t) for t in class_prompts(prompt_names[:1], templates)[0])}.")
        + "\n",
    ]
    for entry in judges:
        folder = eval_dir / slug(entry)
        md += section_judge(entry, m_eval[slug(entry)], pd.read_csv(folder / "per_class.csv"), pd.read_csv(folder / "ranking.csv"),
                            pd.read_csv(folder / "confusion_generated.csv", index_col=0), noun, fig_dir)
    return md


def section_judge(entry: str, res: dict, table: pd.DataFrame, ranking: pd.DataFrame, conf: pd.DataFrame,
                  noun: str, fig_dir: Path) -> list[str]:
    """6. (one judge) Overall numbers, the per-class table and figures, and the easiest/hardest classes."""
    sl, w = slug(entry), R.words(noun)
    items = w["items"]
    R.clip_bars(table, entry, fig_dir / f"clip_{sl}.png", noun)
    R.confusion_heatmap(conf, entry, fig_dir / f"confusion_{sl}.png", noun)
    cols = ["name", "accuracy_generated", "accuracy_real", "clip_score_generated", "clip_score_real", "accuracy_gap", "frechet_distance"]
    return [
        f"### Judge: {entry}\n",
        f"Overall: accuracy {res['accuracy_generated']:.1%} on {res['n_generated']} generated {items} vs "
        f"{res['accuracy_real']:.1%} on {res['n_real']} real ones; CLIP score {res['clip_score_generated']:.2f} vs "
        f"{res['clip_score_real']:.2f}. Frechet distance in the judge's image-embedding space between generated and "
        f"real {items}: {res['frechet_distance']:.4f} ({res['n_generated']} vs {res['n_real']} images); two real sets "
        f"of the same size are {res['frechet_distance_real_reference']:.4f} apart.\n",
        R.md_table(table[cols]) + "\n",
        f"![CLIP per {w['cls']}](figures/clip_{sl}.png)\n",
        f"![confusion](figures/confusion_{sl}.png)\n",
        *section_easiest_hardest(ranking, entry, noun),
    ]


def section_easiest_hardest(ranking: pd.DataFrame, entry: str, noun: str) -> list[str]:
    """6. (one judge) The easiest and hardest classes, from the judge's ``ranking.csv`` (easiest first)."""
    return [f"**Easiest and hardest {R.words(noun)['classes']}.** " + R.easiest_hardest_paragraph(ranking, entry, noun) + "\n"]


def section_samples(m_sample: dict, grid: Path, noun: str, fig_dir: Path) -> list[str]:
    """7. Samples: the sample stage's grid (``grid``), copied to figures/samples.png."""
    shutil.copy(grid, fig_dir / "samples.png")
    return [
        "## 7. Samples\n",
        f"One row per {R.words(noun)['cls']}, {m_sample['sampler']} with {steps_text(m_sample)} and {guidance_text(m_sample)}.\n",
        "![samples](figures/samples.png)\n",
    ]


def section_sweep(sweep: pd.DataFrame | None, m_sample: dict, per_class: int, noun: str, fig_dir: Path) -> list[str]:
    """8. Guidance and samplers: the sweep stage's ``results.csv`` (None: not run)."""
    md = ["## 8. Guidance and samplers\n"]
    if sweep is None:
        return md + ["No sweep results (run the `sweep` stage).\n"]
    R.sweep_plot(sweep, fig_dir / "sweep.png")
    lo, hi = m_sample.get("guidance_interval", [0.0, 1.0])
    w = R.words(noun)
    items = w["items"]
    return md + [
        f"{int(sweep['images'].iloc[0])} {items} per setting ({per_class} per class), judged by "
        f"{w['judge']}{'' if noun == 'digit' else ' (the CLIP `train_clip` trained on this data)'}; the Frechet "
        f"distance is to real test {items} (lower = closer to real, a proxy for diversity and realism). "
        "Guidance: eps = eps_cond + w (eps_cond - eps_uncond), w = 0 being the purely conditional model, "
        f"applied where t/T is in [{lo:g}, {hi:g}] (`sample.guidance_interval`), as in the samples.\n",
        "![sweeps](figures/sweep.png)\n",
        R.md_table(sweep, ".4g") + "\n",
    ]


def section_limitations(m_sample: dict, m_train: dict, stats: dict, head: dict, timesteps: int, noun: str) -> list[str]:
    """9. Limitations measured on this run: speed, resolution, budget, and what the judge can tell."""
    items = R.words(noun)["items"]
    return [
        "## 9. Limitations measured on this run\n",
        f"- Sampling speed: {m_sample['seconds_per_image'] * 1000:.1f} ms per image on {m_sample['device']} with "
        f"{m_sample['sampler']} ({m_sample['network_evaluations_per_image']} network evaluations per image); "
        f"ancestral DDPM would need {timesteps} steps.\n"
        f"- Resolution: {stats['size']}x{stats['size']} with {stats['channels']} channel(s).\n"
        f"- Training budget: {m_train['steps']} steps, {m_train['wall_time_s']:.0f} s.\n"
        f"- The judge: it is right on {head['accuracy_real']:.1%} of real held-out {items}. Generated accuracy "
        f"({head['accuracy_generated']:.1%}) above that means guided samples are more prototypical than real "
        + ("handwriting" if noun == "digit" else items)
        + f" (see the Frechet distance), not that they are better than real {items}.\n",
    ]


def runs_index(path: Path) -> pd.DataFrame:
    """Every run in the tracking database that reached evaluation, newest first (written to ``path``, runs.md)."""
    import mlflow

    df = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], order_by=["attributes.start_time DESC"])
    if "tags.stage.evaluate" in df:
        df = df[df["tags.stage.evaluate"] == "done"]
    out = pd.DataFrame({"run": df["run_id"].str[:8], "started": pd.to_datetime(df["start_time"]).dt.strftime("%Y-%m-%d %H:%M")})
    first, *aliases = TRAINED_ENTRIES  # a run that listed the trained judge by an alias logged it under that name
    for col in [c for c in RUN_COLUMNS if c.startswith(f"metrics.evaluate/{first}/")]:
        for other in (col.replace(first, alias) for alias in aliases):
            if other in df:
                df[col] = df[col].combine_first(df[other]) if col in df else df[other]
    for col, name in RUN_COLUMNS.items():
        out[name] = df[col].values if col in df else ""
    out = out.fillna("")
    text = (
        "# Runs in the tracking database\n\n"
        f"Tracking URI: `{tracking.display_uri()}`, experiment `{tracking.EXPERIMENT}`. Newest first; "
        "accuracy and FD are the dataset CLIP's (digit-clip, alias dataset-clip). Open them side by side with "
        "`mlflow ui --backend-store-uri sqlite:///mlflow.db`.\n\n" + R.md_table(out, ".4g") + "\n"
    )
    path.write_text(text)
    return out


def run_description(stats: dict, m_train: dict, m_sample: dict, judge: str, head: dict) -> str:
    """The run's description in the MLflow UI: what it is, and its headline numbers, in two lines."""
    what = (f"{stats['source']}, {m_train['steps']} steps ({m_train['epochs']} epochs); {m_sample['sampler']} "
            f"{m_sample['steps']} steps at w={m_sample['guidance_scale']:g}")
    numbers = (f"{judge}: {head['accuracy_generated']:.1%} generated vs {head['accuracy_real']:.1%} real, hardest "
               f"{head['worst_class']} {head['worst_class_accuracy']:.1%}; FD {head['frechet_distance']:.4g} "
               f"(real vs real {head['frechet_distance_real_reference']:.4g})")
    return f"{what}\n{numbers}"


@app.command()
@one_line_errors
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    out: Path = typer.Option(Path("reports"), help="report folder"),
) -> None:
    cfg = load_config(params)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    m_train, m_clip, m_sample, m_eval = (read_json(out / "metrics" / f"{s}.json") for s in ("train", "train_clip", "sample", "evaluate"))
    stats = read_json(Path("data/prepared/stats.json"))
    names = stats["class_names"]
    prompt_names, templates = dataset_prompts(stats)
    noun, title = dataset_words(stats)  # digits: "digit"/"digits" throughout; other datasets: "image(s)" and "class(es)"
    train_df = pd.read_csv(out / "plots" / "train_loss.csv")
    val_df = pd.read_csv(out / "plots" / "val_loss.csv")
    model, diffusion, mcfg, info, meta = load_model("models/model.pt")
    v_pred = mcfg.diffusion.prediction == "v"  # the network's target: v, or the noise eps
    sweep = read_csv_if(Path("sweep/results.csv"))
    judge, eval_dir, T = cfg.clip.models[0], Path("evaluation"), diffusion.timesteps

    with tracking.stage_run("report", Path("evaluation/run.json"), None, tracking.stage_params(cfg.flat(), "report"),
                            tracking.run_name(cfg.flat())) as run_id:
        head = m_eval[slug(judge)]  # the first judge's metrics: the headline numbers
        md = section_title(title, run_id)
        md += section_summary(stats, mcfg, count_parameters(model), m_train, m_sample, judge, head, run_id,
                              commit_text(tracking.git_commit(), tracking.uncommitted_code()), noun)
        x0 = to_model_range(load_split("data/prepared", "test")["images"][:1])[0]
        md += section_forward(x0, diffusion, mcfg.diffusion.schedule, noun, fig_dir, cfg.seed)
        traj = load_trajectory(Path("samples/trajectory.npz"))
        md += section_reverse(traj, names, noun, fig_dir)
        curve = read_csv_if(eval_dir / slug(judge) / "recognizability_curve.csv")
        cross = pd.read_csv(eval_dir / slug(judge) / "recognizability.csv") if curve is not None else None
        md += section_recognizability(curve, cross, traj, names, judge, head, v_pred, float(diffusion.sqrt_alpha_bar[-1]), noun, fig_dir)
        md += section_model(model, mcfg, len(names))
        md += section_training(train_df, val_df, m_train, mcfg, T, sorted(Path("models/grids").glob("epoch_*.png")),
                               cfg.report.log_scale_loss, noun, fig_dir)
        md += section_clip(cfg.clip.models, m_eval, m_clip, eval_dir, prompt_names, templates, noun, fig_dir)
        md += section_samples(m_sample, Path("samples/grid.png"), noun, fig_dir)
        md += section_sweep(sweep, m_sample, cfg.sweep.per_class, noun, fig_dir)
        md += section_limitations(m_sample, m_train, stats, head, T, noun)
        report_path = out / "report.md"
        report_path.write_text("\n".join(md))
        for name, table in R.comparison_tables(pd.read_csv(eval_dir / slug(judge) / "per_class.csv"), curve, sweep).items():
            table.to_csv(out / "plots" / f"{name}.csv", index=False)
        runs_index(out / "runs.md")
        tracking.safe.log_artifact(str(report_path), "report")
        tracking.safe.log_artifacts(str(fig_dir), "report/figures")
        tracking.safe.log_artifact(str(out / "runs.md"), "report")
        tracking.safe.set_tag("mlflow.note.content", run_description(stats, m_train, m_sample, judge, head))
        typer.echo(f"wrote {report_path} and {out / 'runs.md'}; MLflow run {run_id}")


if __name__ == "__main__":
    app()
