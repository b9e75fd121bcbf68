"""The report's sections one at a time (stages/report.py): small tables built here, real section code.

The whole report is exercised end to end by tests/test_pipeline.py; these check that each section
says what its inputs say.
"""

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from diffusion_core.clip_eval import rank_classes, recognizability
from stages import report as S

NAMES = ["zero", "one", "two", "three"]


def per_class(acc_gen, acc_real, score_gen=(60.0, 61.0, 62.0, 63.0)):
    """A per_class.csv as the evaluate stage writes it, classes in index order."""
    t = pd.DataFrame({
        "class": range(len(NAMES)), "name": NAMES, "n_generated": 10, "n_real": 10,
        "accuracy_generated": acc_gen, "accuracy_real": acc_real,
        "clip_score_generated": list(score_gen), "clip_score_real": 65.0, "frechet_distance": 0.01,
    })
    t["accuracy_gap"] = t["accuracy_real"] - t["accuracy_generated"]
    t["clip_score_gap"] = t["clip_score_real"] - t["clip_score_generated"]
    return t


def test_easiest_hardest_section_names_the_classes_of_the_table():
    table = per_class([0.5, 0.9, 0.2, 0.7], [0.6, 0.9, 0.3, 1.0])  # gaps 10, 0, 10, 30 points
    (line,) = S.section_easiest_hardest(rank_classes(table), "digit-clip", "digit")
    assert line.startswith("**Easiest and hardest digits.** Judged by digit-clip, ")
    assert "the easiest digits to draw were one (90%), three (70%), zero (50%)" in line
    assert "the hardest were two (20%), zero (50%), three (70%)" in line
    assert "The best digit, one, was recognised in 90%" in line and "the worst, two, in 20%" in line
    assert "a spread of 70 percentage points" in line
    assert "The largest shortfall against real digits is for three: 30 points below" in line
    # other datasets name a class a class; no class below its real accuracy says so
    (line,) = S.section_easiest_hardest(rank_classes(per_class([0.5, 0.9, 0.2, 0.7], [0.5, 0.9, 0.2, 0.7])), "j", "image")
    assert line.startswith("**Easiest and hardest classes.** ") and "The best class, one" in line
    assert "No class falls below the judge's accuracy on real images of the same class." in line


def test_judge_section_writes_its_figures_and_table(tmp_path):
    table = per_class([0.5, 0.9, 0.2, 0.7], [0.6, 0.9, 0.3, 1.0])
    conf = pd.DataFrame(np.eye(4, dtype=int) * 10, index=NAMES, columns=NAMES)
    res = {"accuracy_generated": 0.575, "accuracy_real": 0.7, "n_generated": 40, "n_real": 40, "clip_score_generated": 61.5,
           "clip_score_real": 65.0, "frechet_distance": 0.0123, "frechet_distance_real_reference": 0.0045}
    md = S.section_judge("ViT-B-32:laion", res, table, rank_classes(table), conf, "digit", tmp_path)
    assert md[0] == "### Judge: ViT-B-32:laion\n"
    assert md[1].startswith("Overall: accuracy 57.5% on 40 generated digits vs 70.0% on 40 real ones; CLIP score 61.50 vs 65.00.")
    assert "0.0123 (40 vs 40 images); two real sets of the same size are 0.0045 apart" in md[1]
    assert "| three | 0.700 | 1.000 | 63.000 | 65.000 | 0.300 | 0.010 |" in md[2]  # per_class order, not the ranking's
    assert md[3:5] == ["![CLIP per digit](figures/clip_ViT-B-32__laion.png)\n", "![confusion](figures/confusion_ViT-B-32__laion.png)\n"]
    assert "The best digit, one" in md[5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_ViT-B-32__laion.png", "confusion_ViT-B-32__laion.png"]


@pytest.mark.parametrize("noun, judge", [("digit", "digit-clip"), ("image", "dataset-clip")])
def test_clip_section_names_the_trained_judge_for_the_data(tmp_path, noun, judge):
    """The CLIP the pipeline trains is digit-clip on digits and dataset-clip on any other data,
    never 'digit-clip' for clothes; its real-test accuracy is the ceiling stated."""
    md = S.section_clip([], {}, {"zero_shot_accuracy_test": 0.849}, tmp_path, ["T-shirt/top"], ("a photo of {a} {name}.",), noun, tmp_path)
    intro = md[1]
    assert f"reach. {judge} is a small CLIP trained by the pipeline " in intro
    assert f"(zero-shot accuracy on real test {noun}s 84.9%)" in intro
    assert ("digit-clip" in intro) == (noun == "digit")
    assert ("'a photo of a T-shirt/top.'" in intro) == (noun != "digit")  # other data: the prompts are shown


class PixelJudge:
    """A judge that reads its answer off the image: class round(10 * first pixel)."""

    def encode_images(self, images, batch_size=256):
        return torch.nn.functional.one_hot((images[:, 0, 0, 0] * 10).round().long(), len(NAMES)).float()


def trajectory(x0_plan, xt_plan):
    """Per recorded point: 'right' (every sample judged its class), 'half' (one sample of each
    class judged as the next class), 'noise' (all judged 'zero', the judge's guess for noise)."""
    labels = np.repeat(np.arange(len(NAMES)), 2)
    judged = {"right": labels, "half": np.where(np.arange(len(labels)) % 2, (labels + 1) % len(NAMES), labels),
              "noise": np.zeros_like(labels)}

    def images(plan):
        pred = np.stack([judged[p] for p in plan])  # [P, B]
        return np.broadcast_to((pred / 10.0)[:, :, None, None, None], pred.shape + (1, 2, 2)).astype(np.float32)

    fraction = np.linspace(0, 1, len(x0_plan))
    return {"fraction": fraction, "x_t": images(xt_plan), "x0": images(x0_plan), "labels": labels}


def test_recognizability_section_reports_where_the_judge_first_stays_above_each_threshold(tmp_path):
    # x0: 25% at the start, right from 20%, a dip to 50% at 40%, right again from 60% of the process;
    # x_t: the judge's noise guess until 40%, half right at 60%, right from 80%
    traj = trajectory(["noise", "right", "half", "right", "right", "right"], ["noise", "noise", "noise", "half", "right", "right"])
    text = torch.eye(len(NAMES))[:, None, :]  # [K, T=1, D]
    curve, cross = recognizability(PixelJudge(), traj["fraction"], torch.from_numpy(traj["x_t"]), torch.from_numpy(traj["x0"]),
                                   torch.from_numpy(traj["labels"]), text, NAMES)
    overall = cross[cross["class"] == "all"].set_index("image")  # as the evaluate stage fills its metrics
    head = {f"recognizable_{p}_{k}": float(overall.loc[img, f"fraction_{p}"]) for p in (50, 90) for k, img in (("x0", "x0_pred"), ("xt", "x_t"))}
    md = S.section_recognizability(curve, cross, traj, NAMES, "digit-clip", head, True, 0.1, "digit", tmp_path)
    assert md[0].startswith("The judge (digit-clip) classified 8 digits at each recorded point")
    assert "the predicted x̂_0 is judged correct for at least 50% of digits from 20% of the process on, and for 90% from 60%" in md[0]
    assert "the noisy state x_t itself passes 50% from 60% and 90% from 80% (resolution: one recorded point per 20%)" in md[0]
    assert "With v-prediction" in md[0]
    assert md[1] == "![recognizability](figures/recognizability.png)\n" and (tmp_path / "recognizability.png").is_file()
    rows = md[3].splitlines()
    assert rows[0] == "| class | fraction_50 (x0_pred) | fraction_50 (x_t) | fraction_90 (x0_pred) | fraction_90 (x_t) |"
    assert rows[2] == "| all | 0.2 | 0.6 | 0.6 | 0.8 |"
    # 'zero' is judged right on noise (recall 100%) but so is everything else: precision keeps it out until 60%
    assert rows[3] == "| zero | 0.2 | 0.6 | 0.6 | 0.8 |" and [r.split(" | ")[0] for r in rows[2:]] == ["| all", *("| " + n for n in NAMES)]

    eps = S.section_recognizability(curve, cross, traj, NAMES, "digit-clip", {**head, "recognizable_90_xt": math.nan}, False, 0.123, "digit", tmp_path)
    assert "90% from never (resolution" in eps[0] and "divides by √ᾱ_t ≈ 0.123 at pure noise" in eps[0]
    assert S.section_recognizability(None, None, traj, NAMES, "digit-clip", head, True, 0.1, "digit", tmp_path) == []


def test_training_text_follows_the_hardest_noise_level_and_the_target():
    by_t = pd.DataFrame({"timesteps": ["1-25", "26-50", "51-75", "76-100"], "val_loss": [0.3, 0.2, 0.5, 0.9]})
    eps = S.noise_level_text(by_t, False, "digit")
    assert eps.startswith("By noise level, the validation loss is highest for t in 76-100 (0.9000) and lowest for t in 26-50 (0.2000)")
    assert eps.endswith("there little of the digit is left, so telling the noise from the digit is hardest.\n")
    assert "v is mostly the clean image" in S.noise_level_text(by_t, True, "image")
    low = S.noise_level_text(by_t.assign(val_loss=[0.9, 0.2, 0.5, 0.3]), True, "digit")
    assert "highest for t in 1-25 (0.9000) and lowest for t in 26-50" in low and "the target v is mostly that noise" in low
    mid = S.noise_level_text(by_t.assign(val_loss=[0.3, 0.2, 0.9, 0.5]), True, "digit")  # bin 2 of 4: the noisier half
    assert "highest for t in 51-75 (0.9000)" in mid and "little of the digit is left and v is mostly the clean digit" in mid

    cfg = tiny_config(diffusion={"timesteps": 100, "prediction": "eps", "loss_weighting": "min_snr", "min_snr_gamma": 5.0, "t_sampling": "stratified"})
    text = S.loss_text(cfg.diffusion, "digit")
    assert text.startswith("The loss is the mean squared error between the noise ε")
    assert "min-SNR-γ (γ = 5)" in text and text.endswith("as many equal slices of [0, T) as the batch has images.")
    text = S.loss_text(tiny_config(diffusion={"prediction": "v", "t_sampling": "logit_normal", "t_logit_mean": -0.5}).diffusion, "digit")
    assert "between the velocity v" in text and "n ~ N(-0.5, 1²)" in text and "min-SNR" not in text


def test_training_section_draws_its_figures(tmp_path):
    train = pd.DataFrame({"step": range(1, 11), "loss": np.linspace(1.0, 0.5, 10)})
    val = pd.DataFrame({"step": [5, 10], "val_loss": [0.8, 0.6], "val_loss_t0": [0.9, 0.7], "val_loss_t1": [0.7, 0.4]})
    m_train = {"final_train_loss": 0.55, "final_val_loss": 0.6}
    md = S.section_training(train, val, m_train, tiny_config(), 100, [], False, "digit", tmp_path)
    assert md[0] == "## 5. Training\n"
    assert md[1].endswith("Final training loss (mean of the last epoch) 0.5500, validation loss (EMA weights, fixed noise) 0.6000.\n")
    assert md[3].startswith("By noise level, the validation loss is highest for t in 1-50 (0.7000) and lowest for t in 51-100 (0.4000)")
    assert len(md) == 5  # no epoch grids, no grid figure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "val_by_timestep.png"]


def test_summary_sweep_and_limitations_take_their_numbers_from_the_metrics(tmp_path):
    cfg = tiny_config()
    stats = {"source": "mnist-5k", "description": "d", "channels": 1, "size": 28,
             "splits": {"train": {"total": 300}, "val": {"total": 20}, "test": {"total": 30}}}
    m_train = {"steps": 40, "epochs": 2, "wall_time_s": 12.4, "device": "cpu", "images_per_s": 99.6, "final_val_loss": 0.12345}
    m_sample = {"sampler": "dpm++2m", "steps": 10, "timestep_spacing": "logsnr", "guidance_scale": 0.6, "guidance_interval": [0.0, 0.5],
                "guided_steps": 5, "seconds_per_image": 0.0034, "device": "cpu", "network_evaluations_per_image": 15}
    head = {"accuracy_generated": 0.976, "accuracy_real": 0.97, "worst_class": "three", "worst_class_accuracy": 0.955}
    md = S.section_summary(stats, cfg, 1234, m_train, m_sample, "digit-clip", head, "abc", S.commit_text("c0", []), "digit")
    assert md[0] == "## 1. Run summary\n"
    for row in ["| dataset | mnist-5k: d (300 train / 20 val / 30 test) |", "| model | U-Net, 1,234 parameters |",
                "| training | 40 steps (2 epochs, batch 16) in 12 s on cpu (100 images/s) |",
                "| sampler | dpm++2m, 10 steps (logsnr spacing), guidance w=0.6 at the 5 of 10 steps with t/T in [0, 0.5], the conditional model alone at the others |",
                "| final validation loss | 0.1235 |", "| judged accuracy (digit-clip) | 97.6% generated vs 97.0% real |",
                "| worst digit | three (95.5%) |", "| MLflow run | `abc` |", "| git commit | `c0` |"]:
        assert row in md[1], row

    lim = "".join(S.section_limitations(m_sample, m_train, stats, head, 100, "image"))
    assert "3.4 ms per image on cpu with dpm++2m (15 network evaluations per image); ancestral DDPM would need 100 steps" in lim
    assert "more prototypical than real images (see" in lim and "handwriting" not in lim

    assert S.section_sweep(None, m_sample, 2, "digit", tmp_path) == ["## 8. Guidance and samplers\n", "No sweep results (run the `sweep` stage).\n"]
    sweep = pd.DataFrame({"sweep": ["guidance", "guidance", "sampler"], "sampler": ["dpm++2m", "dpm++2m", "ddim"], "steps": [10, 10, 10],
                          "guidance_scale": [0.0, 0.6, 0.6], "images": [20, 20, 20], "accuracy": [0.8, 0.9, 0.85],
                          "clip_score": [60.0, 61.0, 60.5], "frechet_distance": [0.02, 0.01, 0.015], "seconds_per_image": [0.003, 0.003, 0.004]})
    md = S.section_sweep(sweep, m_sample, 2, "digit", tmp_path)
    assert md[1].startswith("20 digits per setting (2 per class), judged by digit-clip")
    other = S.section_sweep(sweep, m_sample, 2, "image", tmp_path)  # any other dataset: the judge under its neutral name
    assert other[1].startswith("20 images per setting (2 per class), judged by dataset-clip (the CLIP `train_clip` trained on this data)")
    assert "applied where t/T is in [0, 0.5] (`sample.guidance_interval`)" in md[1]
    assert "| sampler | ddim | 10 | 0.6 | 20 | 0.85 | 60.5 | 0.015 | 0.004 |" in md[3] and (tmp_path / "sweep.png").is_file()


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_model_and_forward_sections_describe_the_built_network(tmp_path, prediction):
    from diffusion_core.checkpoint import build_model
    from diffusion_core.unet import count_parameters

    cfg = tiny_config(diffusion={"timesteps": 100, "prediction": prediction}, model={"conditioning": "add", "attention_resolutions": []})
    model, diffusion = build_model(cfg, {"class_names": NAMES, "channels": 1, "size": 28})
    md = S.section_model(model, cfg, len(NAMES))
    assert md[1].startswith(f"The network {'v_θ' if prediction == 'v' else 'ε_θ'}(x_t, t, y) built from `params.yaml` (`model` group): "
                            f"{count_parameters(model):,} parameters.")
    assert f"({len(NAMES)} classes + 1 null class for guidance)" in md[1] and S.CONDITIONING_TEXT["add"] in md[1]
    side = model.resolutions[-1]
    assert md[1].endswith(f"self-attention sits in the middle block ({side}x{side}).\n")
    assert md[2].startswith("| stage | resolution |") and md[2].count("\n") == len(model.describe()) + 2  # header, rule, one row per block

    if prediction == "v":
        fwd = S.section_forward(torch.zeros(1, 28, 28), diffusion, "linear", "image", tmp_path, 0)
        assert fwd[1].startswith("A real test image noised with") and "under the run's linear schedule" in fwd[1]
        assert (tmp_path / "forward.png").is_file()


def test_runs_index_reads_the_trained_judge_under_either_name(tmp_path):
    """runs.md lists every evaluated run with its judged accuracy, worst class and FD, whether the run
    listed the trained judge as digit-clip or as its alias dataset-clip (the non-digit presets do)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from diffusion_core import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)  # no global MLflow state is touched but the URI, reset below
    exp = client.create_experiment(tracking.EXPERIMENT)
    for judge, acc, fd in (("digit-clip", 0.97, 0.017), ("dataset-clip", 0.83, 0.021)):
        run = client.create_run(exp, tags={"stage.evaluate": "done"})
        for key, value in (("accuracy_generated", acc), ("worst_class_accuracy", acc - 0.1), ("frechet_distance", fd)):
            client.log_metric(run.info.run_id, f"evaluate/{judge}/{key}", value)
        time.sleep(0.01)  # distinct start times: newest first is well defined
    client.create_run(exp, tags={"stage.evaluate": "running"})  # never evaluated: not listed
    mlflow.set_tracking_uri(uri)
    try:
        out = S.runs_index(tmp_path / "runs.md")
    finally:
        mlflow.set_tracking_uri(None)
    assert list(out["accuracy"]) == [0.83, 0.97]  # newest first: dataset-clip's run, then digit-clip's
    assert list(out["FD"]) == [0.021, 0.017] and list(out["worst class"]) == pytest.approx([0.73, 0.87])
    assert "| 0.83 |" in (tmp_path / "runs.md").read_text()
