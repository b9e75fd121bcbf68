"""Figures and text for the generated report (seaborn/matplotlib, saved as PNG).

Every figure and sentence is made from the run's own files: nothing in the text is fixed except
the explanations of what a quantity means.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from diffusion_core.clip_judge import TRAINED_ENTRIES  # noqa: E402
from diffusion_core.images import make_grid  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def words(noun: str = "digit") -> dict[str, str]:
    """How the report names one image and one class of the dataset (``noun`` from its stats).

    Digits are both the images and the classes ("the hardest digit", "real digits"); for other
    datasets an image is an ``noun`` and a class a "class" ("the hardest class", "real images").
    ``judge`` is the name of the CLIP the pipeline trains on the data: digit-clip for digits, else
    dataset-clip (the same judge under its dataset-neutral alias).
    """
    if noun == "digit":
        return {"item": "digit", "items": "digits", "cls": "digit", "classes": "digits", "judge": TRAINED_ENTRIES[0]}
    return {"item": noun, "items": noun + "s", "cls": "class", "classes": "classes", "judge": TRAINED_ENTRIES[1]}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _show(ax, img: np.ndarray) -> None:
    """img [C, H, W] in [-1, 1] (or beyond, clipped)."""
    img = np.clip((img + 1) / 2, 0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.transpose(1, 2, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def forward_timesteps(timesteps: int) -> list[int]:
    """The timesteps the forward strip shows: 0, T/20, T/10, T/5, 3T/10, T/2, 7T/10 and T-1 (distinct, sorted)."""
    T = timesteps
    return sorted({0, T // 20, T // 10, T // 5, 3 * T // 10, T // 2, 7 * T // 10, T - 1})


def forward_strip(x0: torch.Tensor, diffusion, timesteps: list[int], path: Path, seed: int = 0) -> Path:
    """One real image noised to each timestep, with alpha_bar and SNR under each."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    fig, axes = plt.subplots(1, len(timesteps), figsize=(1.5 * len(timesteps), 2.1))
    for ax, t in zip(axes, timesteps):
        tt = torch.tensor([t])
        x_t = diffusion.q_sample(x0[None], tt, eps[None])[0]
        _show(ax, x_t.numpy())
        ab = float(diffusion.alpha_bar[t])
        snr = float(diffusion.snr[t])
        ax.set_title(f"t={t + 1}", fontsize=9)
        ax.set_xlabel(f"ᾱ={ab:.3f}\nSNR={snr:.3g}", fontsize=8)
    fig.suptitle("Forward diffusion q(x_t | x_0)", fontsize=10)
    return _save(fig, path)


def mosaic(cells: np.ndarray, pad: int = 2) -> np.ndarray:
    """cells [R, K, C, H, W] in [-1, 1] -> one [R(H+pad)-pad, K(W+pad)-pad(, 3)] image in [0, 1],
    white between the cells (:func:`~diffusion_core.images.make_grid` without its outer frame): drawn
    with one imshow, it saves in a fraction of the time of R x K axes."""
    r_n, k_n, c, h, w = cells.shape
    flat = torch.from_numpy(np.clip((cells.reshape(r_n * k_n, c, h, w) + 1) / 2, 0, 1).astype(np.float32))
    img = make_grid(flat, nrow=k_n, padding=pad, pad_value=1.0).numpy()
    if r_n * k_n > 1 and pad:  # make_grid leaves a single image unframed
        img = img[:, pad:-pad, pad:-pad]
    return img[0] if c == 1 else img.transpose(1, 2, 0)


def reverse_strips(traj: dict, class_names: list[str], which: str, path: Path, pad: int = 2) -> Path:
    """One row per class (its first recorded image), one column per recorded point."""
    fr, labels, imgs = traj["fraction"], traj["labels"], traj[which]
    rows = [int(np.flatnonzero(labels == c)[0]) for c in range(len(class_names)) if (labels == c).any()]
    cells = np.stack([imgs[:, b] for b in rows]).astype(np.float32)  # [rows, points, C, H, W]
    h, w = cells.shape[-2:]
    fig, ax = plt.subplots(figsize=(1.0 * len(fr), 1.0 * len(rows)))
    ax.imshow(mosaic(cells, pad), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([p * (w + pad) + w / 2 for p in range(len(fr))], [f"{f:.0%}" for f in fr], fontsize=8)
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(len(rows))], [class_names[int(labels[b])] for b in rows], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.grid(False)
    for side in ax.spines.values():
        side.set_visible(False)
    label = "state x_t" if which == "x_t" else "predicted clean image x̂_0"
    ax.set_title(f"Reverse diffusion, {label}, by share of sampler steps done", fontsize=10, pad=18)
    return _save(fig, path)


def recognizability_plot(curve: pd.DataFrame, cross: pd.DataFrame, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind, title in ((axes[0], "x0_pred", "predicted x̂_0"), (axes[1], "x_t", "state x_t (clipped)")):
        d = curve[curve["image"] == kind]
        per = d[d["class"] != "all"]
        sns.lineplot(data=per, x="fraction", y="accuracy", hue="class", ax=ax, palette="tab10", alpha=0.45, linewidth=1)
        allc = d[d["class"] == "all"]
        ax.plot(allc["fraction"], allc["accuracy"], color="black", linewidth=2.5, label="all")
        for thr, style in ((0.5, ":"), (0.9, "--")):
            ax.axhline(thr, color="grey", linestyle=style, linewidth=1)
            c = cross[(cross["image"] == kind) & (cross["class"] == "all")]["fraction_%d" % int(thr * 100)]
            if len(c) and not math.isnan(float(c.iloc[0])):
                ax.axvline(float(c.iloc[0]), color="grey", linestyle=style, linewidth=1)
        ax.set_title(f"Judge accuracy on {title}")
        ax.set_xlabel("share of the reverse process done")
        ax.set_ylabel("zero-shot accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _save(fig, path)


def loss_curves(train: pd.DataFrame, val: pd.DataFrame, path: Path, log_scale: bool, ylabel: str = "noise-prediction MSE") -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    window = max(1, len(train) // 50)
    ax.plot(train["step"], train["loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax.plot(train["step"], train["loss"].rolling(window, min_periods=1).mean(), color="tab:blue", linewidth=2, label=f"train (mean of {window} steps)")
    if len(val):
        ax.plot(val["step"], val["val_loss"], "o-", color="tab:orange", linewidth=2, label="validation (EMA, per epoch)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title("Training and validation loss")
    ax.legend()
    return _save(fig, path)


def val_by_timestep(val: pd.DataFrame, timesteps: int, path: Path) -> tuple[Path, pd.DataFrame]:
    last = val.iloc[-1]
    cols = sorted([c for c in val.columns if c.startswith("val_loss_t")], key=lambda c: int(c[len("val_loss_t"):]))
    bins = len(cols)
    df = pd.DataFrame(
        {
            "timesteps": [f"{b * timesteps // bins + 1}-{(b + 1) * timesteps // bins}" for b in range(bins)],
            "val_loss": [float(last[c]) for c in cols],
        }
    )
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.barplot(data=df, x="timesteps", y="val_loss", color="tab:orange", ax=ax)
    ax.set_xlabel("timestep t (1 = almost clean, T = pure noise)")
    ax.set_ylabel("validation MSE")
    ax.set_title("Validation loss by noise level (final epoch)")
    ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, path), df


def epoch_grids(grid_paths: list[Path], path: Path, max_panels: int = 5) -> Path:
    from PIL import Image

    if len(grid_paths) > max_panels:
        idx = np.unique(np.linspace(0, len(grid_paths) - 1, max_panels).round().astype(int))
        grid_paths = [grid_paths[i] for i in idx]
    fig, axes = plt.subplots(1, len(grid_paths), figsize=(2.2 * len(grid_paths), 5), squeeze=False)
    for ax, p in zip(axes[0], grid_paths):
        ax.imshow(Image.open(p), cmap="gray")
        ax.set_title(p.stem.replace("_", " "), fontsize=9)
        ax.axis("off")
    fig.suptitle("Fixed-noise samples during training (same noise and labels)", fontsize=10)
    return _save(fig, path)


def clip_bars(table: pd.DataFrame, judge: str, path: Path, noun: str = "digit") -> Path:
    x = words(noun)["cls"]
    long = pd.concat(
        [
            pd.DataFrame({x: table["name"], "set": "generated", "accuracy": table["accuracy_generated"], "clip_score": table["clip_score_generated"]}),
            pd.DataFrame({x: table["name"], "set": "real", "accuracy": table["accuracy_real"], "clip_score": table["clip_score_real"]}),
        ]
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.barplot(data=long, x=x, y="accuracy", hue="set", ax=axes[0], palette=["tab:blue", "tab:gray"])
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title(f"Zero-shot accuracy ({judge})")
    sns.barplot(data=long, x=x, y="clip_score", hue="set", ax=axes[1], palette=["tab:blue", "tab:gray"])
    axes[1].set_title(f"CLIP score ({judge})")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, path)


def confusion_heatmap(conf: pd.DataFrame, judge: str, path: Path, noun: str = "digit") -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sns.heatmap(conf, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax)
    ax.set_xlabel("judged as")
    ax.set_ylabel("asked for")
    ax.set_title(f"Confusion of generated {words(noun)['items']} ({judge})")
    return _save(fig, path)


def sweep_plot(sweep: pd.DataFrame, path: Path) -> Path:
    """Guidance: accuracy and Frechet distance against w. Samplers: both against time per image."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2), gridspec_kw={"wspace": 0.45})
    g = sweep[sweep["sweep"] == "guidance"]
    ax = axes[0]
    if len(g):
        ax.plot(g["guidance_scale"], g["accuracy"], "o-", color="tab:blue")
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel("judged accuracy", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(g["guidance_scale"], g["frechet_distance"], "s--", color="tab:red")
        ax2.set_ylabel("Frechet distance to real", color="tab:red")
        ax2.grid(False)
        ax.set_title("Guidance: accuracy vs closeness to real")
    s = sweep[sweep["sweep"] == "sampler"]
    for ax, col, label in ((axes[1], "accuracy", "judged accuracy"), (axes[2], "frechet_distance", "Frechet distance to real")):
        for k, (name, grp) in enumerate(s.groupby("sampler")):
            ax.plot(grp["seconds_per_image"] * 1000, grp[col], "o-", label=name)
            for _, r in grp.iterrows():
                ax.annotate(f"{int(r['steps'])} steps", (r["seconds_per_image"] * 1000, r[col]), fontsize=7,
                            xytext=(4, 6 - 14 * k), textcoords="offset points")
        ax.set_xlabel("ms per image")
        ax.set_ylabel(label)
        ax.set_title(f"Samplers: {label} vs time")
        if len(s):
            ax.legend()
    return _save(fig, path)


def pct(x: float) -> str:
    """A share as a percentage, or 'never' for NaN (the threshold was not reached)."""
    return "never" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def crossing_table(cross: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """The recognizability crossings (rows image x class) as one row per class (``all`` first, then
    ``class_names``) with a column per threshold and image, e.g. ``fraction_50 (x_t)``."""
    wide = cross.pivot(index="class", columns="image", values=["fraction_50", "fraction_90"])
    wide = wide.reindex(["all", *class_names])
    wide.columns = [f"{a} ({b})" for a, b in wide.columns]
    return wide.reset_index()


def md_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    cols = list(df.columns)

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def easiest_hardest_paragraph(ranking: pd.DataFrame, judge: str, noun: str = "digit") -> str:
    """Plain-language summary of the ranking, every number taken from it."""
    w = words(noun)
    cls, classes, items = w["cls"], w["classes"], w["items"]
    best, worst = ranking.iloc[0], ranking.iloc[-1]
    spread = best["accuracy_generated"] - worst["accuracy_generated"]
    top = ", ".join(f"{r['name']} ({r['accuracy_generated']:.0%})" for _, r in ranking.head(3).iterrows())
    bottom = ", ".join(f"{r['name']} ({r['accuracy_generated']:.0%})" for _, r in ranking.tail(3).iloc[::-1].iterrows())
    gap = ranking.sort_values("accuracy_gap", ascending=False).iloc[0]
    text = (
        f"Judged by {judge}, the easiest {classes} to draw were {top}; the hardest were {bottom}. "
        f"The best {cls}, {best['name']}, was recognised in {best['accuracy_generated']:.0%} of its samples "
        f"(CLIP score {best['clip_score_generated']:.1f}, real {items} {best['accuracy_real']:.0%}); the worst, "
        f"{worst['name']}, in {worst['accuracy_generated']:.0%} (CLIP score {worst['clip_score_generated']:.1f}, "
        f"real {items} {worst['accuracy_real']:.0%}), a spread of {spread * 100:.0f} percentage points. "
    )
    if gap["accuracy_gap"] > 0:
        points = f"{gap['accuracy_gap'] * 100:.0f}"
        text += (
            f"The largest shortfall against real {items} is for {gap['name']}: {points} point{'' if points == '1' else 's'} "
            f"below the judge's accuracy on real {items} of that class, so that gap is the model's, not the judge's."
        )
    else:
        text += f"No {cls} falls below the judge's accuracy on real {items} of the same class."
    return text


COMPARISON_TABLES = ("per_class_accuracy", "recognizability", "guidance_sweep")


def comparison_tables(per_class: pd.DataFrame, curve: pd.DataFrame | None, sweep: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """The tables ``dvc plots diff`` draws side by side across experiments (dvc.yaml's ``plots:``):
    the first judge's accuracy per class on generated and real images; its recognizability curve
    over all classes (accuracy of x_t and of the predicted x0 at each fraction of the reverse
    process); the guidance sweep (accuracy and FD against w). A missing input gives an empty table."""
    tables = {"per_class_accuracy": per_class[["name", "accuracy_generated", "accuracy_real"]]}
    rec = pd.DataFrame(columns=["fraction", "accuracy_x_t", "accuracy_x0_pred"])
    if curve is not None and not curve.empty:
        wide = curve[curve["class"] == "all"].pivot(index="fraction", columns="image", values="accuracy")
        rec = wide.rename(columns=lambda c: f"accuracy_{c}").reset_index()[rec.columns]
    tables["recognizability"] = rec
    cols = ["guidance_scale", "accuracy", "frechet_distance"]
    tables["guidance_sweep"] = sweep[sweep["sweep"] == "guidance"][cols] if sweep is not None else pd.DataFrame(columns=cols)
    return tables
