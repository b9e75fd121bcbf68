"""CLIP metrics: CLIP score, zero-shot accuracy, confusion, Frechet distance, recognizability.

Conventions (stated in the report):

* CLIP score = 100 * max(cos(image, prompt), 0), the torchmetrics convention, averaged over the
  prompt templates of the class the image was asked for.
* Zero-shot prediction = the class whose prompts score highest (mean cosine over its templates).
* Frechet distance between two sets of L2-normalised CLIP image embeddings
  ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), computed in float64 with
  symmetric eigendecompositions (no scipy, stable for singular covariances).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from diffusion_core.clip_judge import DIGIT_TEMPLATES, ClipJudge, class_prompts


def cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """[N, D] x [K, T, D] -> [N, K, T] cosine similarities (inputs L2-normalised)."""
    return torch.einsum("nd,ktd->nkt", image_emb.float(), text_emb.float())


def clip_scores(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] CLIP score of each image against its own class's prompts (mean over templates)."""
    own = cos[torch.arange(len(labels)), labels]  # [N, T]
    return (100.0 * own.clamp(min=0)).mean(-1)


def zero_shot(cos: torch.Tensor) -> torch.Tensor:
    """[N] predicted class: highest mean cosine over the class's templates."""
    return cos.mean(-1).argmax(-1)


def confusion_matrix(labels: torch.Tensor, pred: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows: requested class; columns: judged class; counts."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    a, b = a.double(), b.double()
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross
    return float(fd.clamp(min=0))


def judge_images(judge: ClipJudge, images: torch.Tensor, labels: torch.Tensor, text_emb: torch.Tensor, batch_size: int = 256):
    """-> (embeddings [N, D], CLIP scores [N], zero-shot predictions [N])."""
    emb = judge.encode_images(images, batch_size)
    cos = cosines(emb, text_emb)
    return emb, clip_scores(cos, labels), zero_shot(cos)


def per_class_table(
    class_names: list[str],
    gen_labels: torch.Tensor, gen_score: torch.Tensor, gen_pred: torch.Tensor, gen_emb: torch.Tensor,
    real_labels: torch.Tensor, real_score: torch.Tensor, real_pred: torch.Tensor, real_emb: torch.Tensor,
) -> pd.DataFrame:
    rows = []
    for c, name in enumerate(class_names):
        g, r = gen_labels == c, real_labels == c
        rows.append(
            {
                "class": c,
                "name": name,
                "n_generated": int(g.sum()),
                "n_real": int(r.sum()),
                "accuracy_generated": float((gen_pred[g] == c).float().mean()) if g.any() else math.nan,
                "accuracy_real": float((real_pred[r] == c).float().mean()) if r.any() else math.nan,
                "clip_score_generated": float(gen_score[g].mean()) if g.any() else math.nan,
                "clip_score_real": float(real_score[r].mean()) if r.any() else math.nan,
                "frechet_distance": frechet_distance(gen_emb[g], real_emb[r]),
            }
        )
    df = pd.DataFrame(rows)
    df["accuracy_gap"] = df["accuracy_real"] - df["accuracy_generated"]
    df["clip_score_gap"] = df["clip_score_real"] - df["clip_score_generated"]
    return df


def rank_classes(table: pd.DataFrame) -> pd.DataFrame:
    """Easiest first: by generated accuracy, then CLIP score, then the smallest gap to real."""
    ranked = table.sort_values(
        ["accuracy_generated", "clip_score_generated", "accuracy_gap"], ascending=[False, False, True]
    ).reset_index(drop=True)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked


def first_crossing(fractions: np.ndarray, accuracy: np.ndarray, threshold: float) -> float:
    """The earliest recorded fraction from which accuracy stays >= threshold to the end (nan: never).

    "Stays" matters: a judge that calls pure noise "eight" is 100% right on eights at the very start
    of the process, which says nothing about when eights become recognizable.
    """
    below = np.flatnonzero(accuracy < threshold)
    if len(below) == 0:
        return float(fractions[0])
    after = below[-1] + 1
    return float(fractions[after]) if after < len(fractions) else math.nan


def recognizability(
    judge: ClipJudge,
    fractions: np.ndarray,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    labels: torch.Tensor,
    text_emb: torch.Tensor,
    class_names: list[str],
    batch_size: int = 256,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Judge accuracy along the reverse process.

    ``x_t`` and ``x0`` are [P, B, C, H, W] at ``fractions`` [P] of the process. The noisy state x_t
    is clipped to [-1, 1] before judging (what a person would see). Returns the curve (one row per
    point and class, plus class ``all``) and the 50% / 90% crossing points per class.

    A class counts as recognized at a point when both its accuracy (recall: its samples judged as
    it) and its precision (the samples judged as it that are it) reach the threshold. Accuracy
    alone is fooled by the judge's default guess: a judge that calls noise "eight" is right about
    every eight from the first step on. For ``all`` the overall accuracy is used (chance: 1/K).
    """
    curve = []
    for p, f in enumerate(fractions):
        for kind, images in (("x0_pred", x0[p]), ("x_t", x_t[p].clamp(-1, 1))):
            pred = zero_shot(cosines(judge.encode_images(images.float(), batch_size), text_emb))
            correct = (pred == labels).float()
            acc = float(correct.mean())
            curve.append({"fraction": float(f), "image": kind, "class": "all", "accuracy": acc, "precision": acc})  # micro precision = accuracy
            for c, name in enumerate(class_names):
                m = labels == c
                if m.any():
                    recall = float(correct[m].mean())
                    judged = pred == c
                    precision = float((labels[judged] == c).float().mean()) if judged.any() else 0.0
                    curve.append({"fraction": float(f), "image": kind, "class": name, "accuracy": recall, "precision": precision})
    curve_df = pd.DataFrame(curve)
    cross = []
    for (kind, cls), grp in curve_df.groupby(["image", "class"], sort=False):
        grp = grp.sort_values("fraction")
        fr, score = grp["fraction"].to_numpy(), np.minimum(grp["accuracy"].to_numpy(), grp["precision"].to_numpy())
        cross.append({"image": kind, "class": cls, "fraction_50": first_crossing(fr, score, 0.5), "fraction_90": first_crossing(fr, score, 0.9)})
    return curve_df, pd.DataFrame(cross)


def text_embeddings(judge: ClipJudge, class_names: list[str], templates: tuple[str, ...] = DIGIT_TEMPLATES) -> torch.Tensor:
    """[K, T, D] embeddings of each class's captions (``class_names`` as the captions say them)."""
    return judge.encode_prompts(class_prompts(class_names, templates))
