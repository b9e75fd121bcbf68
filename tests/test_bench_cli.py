"""The benchmarks' command lines: a bad or unknown argument stops before any row runs.

bench/scaling.py once parsed sys.argv by hand, so ``--help`` (or a typo) silently started the
full width x batch table, about 10 minutes of work."""

import re

import pytest

from bench import digit_clip, scaling, vs_diffusers


@pytest.mark.parametrize("argv, message", [
    (["--help"], "usage:"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--repeats", "2"], "--repeats and --only go with --levers"),
    (["--levers", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["--levers", "--dataset", "mnist"], "not allowed with argument"),
])
def test_scaling_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        scaling.parse_args(argv)
    captured = capsys.readouterr()
    assert message in captured.out + captured.err


def test_scaling_levers_only_must_match_a_variant(monkeypatch):
    monkeypatch.setattr(scaling, "run", lambda spec: pytest.fail("a row ran"))
    with pytest.raises(SystemExit, match="--only 'zzz' matches no variant; the variants are: float32 eager"):
        scaling.main(["--levers", "--only", "zzz"])
    args = scaling.parse_args(["--levers"])
    assert args.levers and args.repeats == 3 and args.only is None


def test_scaling_levers_report_a_failed_row_and_go_on(monkeypatch, capsys):
    """A row whose process dies (held to AVX2, compiled bf16 once segfaulted) is a row with its
    failure; the other rows are still measured, over every round."""
    calls = []

    def fake_run(spec):
        calls.append(spec)
        if spec.get("env"):
            raise scaling.RowFailed("killed by signal 11; ")
        return {"runs_as": "fp32, eager, NCHW", "params": 1, "steps_per_s": 2.0, "images_per_s": 64.0, "warmup_s": 0.1, "peak_rss_mib": 9.0}

    monkeypatch.setattr(scaling, "run", fake_run)
    scaling.main(["--levers", "--repeats", "2", "--only", "AVX2,1 thread"])
    out = capsys.readouterr().out
    assert len(calls) == 2 + 2 + 2 * 1  # params.yaml and "1 thread" twice; each held-to-AVX2 row once
    assert out.count("| failed: killed by signal 11;  |") == 2
    assert re.search(r"\| 1 thread \| fp32, eager, NCHW \| 1 \| 2 \| 64 \| 0.1 \| 9 \| 64-64 \| 1 \|", out)


@pytest.mark.parametrize("argv", [["--batch-size", "-1"], ["--lr", "-0.002"], ["--patch-grid", "-2"], ["--muon-lr", "-0.008"]])
def test_digit_clip_refuses_negative_overrides_before_training(argv, monkeypatch):
    monkeypatch.setattr(digit_clip, "build_splits", lambda *a, **k: pytest.fail("the data was built"))
    with pytest.raises(SystemExit, match="--batch-size, --lr, --muon-lr and --patch-grid must not be negative"):
        digit_clip.main(argv)


def test_digit_clip_refuses_a_patch_grid_that_does_not_divide_the_images(monkeypatch):
    monkeypatch.setattr(digit_clip, "build_splits", lambda *a, **k: pytest.fail("the data was built"))
    with pytest.raises(SystemExit, match="--patch-grid 3 does not divide mnist-5k's image size 28"):
        digit_clip.main(["--patch-grid", "3"])


def test_every_recipe_variant_is_a_valid_config_that_changes_what_it_names():
    """bench/recipe.py's variants are dotted params.yaml overrides: a misspelt key or a bad value
    would otherwise surface only when that row starts training, minutes into a run."""
    from bench.recipe import MUON30, MUON_SETTINGS, VARIANTS
    from diffusion_core.config import load_config

    for name, overrides in VARIANTS.items():
        cfg = load_config("params.yaml", {"train.epochs": 30, **overrides}).to_dict()
        for key, value in overrides.items():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)
    assert {f"{MUON30} + {s}" for s in MUON_SETTINGS} <= VARIANTS.keys()
    assert VARIANTS[f"{MUON30} + no grad clip + seed 2"]["seed"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "0"], "--budget-s must be > 0, got 0"),
    (["--arithmetic", "gpu"], "invalid choice: 'gpu'"),
    (["--steps", "-5"], "--steps must be >= 0, got -5"),
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["--rounds", "-1"], "--rounds must be >= 0, got -1"),
])
def test_vs_diffusers_refuses_bad_arguments_before_training(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(vs_diffusers, "get_judge", lambda: pytest.fail("the judge was loaded"))
    with pytest.raises(SystemExit):
        vs_diffusers.main(argv)
    assert message in capsys.readouterr().err


def test_same_outputs_refuses_an_unknown_revision_and_masks_only_what_differs_between_runs(monkeypatch):
    from bench import same_outputs

    monkeypatch.setattr(same_outputs, "run_stages", lambda root: pytest.fail("a stage ran"))
    monkeypatch.setattr("sys.argv", ["same_outputs.py", "--base", "no-such-rev"])
    with pytest.raises(SystemExit, match="--base: 'no-such-rev' is not a git revision"):
        same_outputs.main()
    a = "| MLflow run | `" + "a" * 32 + "` |\n| training | 3750 steps in 118 s |\n| accuracy | 97.6% |"
    b = "| MLflow run | `" + "b" * 32 + "` |\n| training | 3750 steps in 97 s |\n| accuracy | 97.6% |"
    assert same_outputs.masked(a) == same_outputs.masked(b)
    assert same_outputs.masked(a) != same_outputs.masked(a.replace("97.6%", "97.5%"))
