"""The benchmarks' command lines: a bad or unknown argument stops before any row runs.

bench/scaling.py once parsed sys.argv by hand, so ``--help`` (or a typo) silently started the
full width x batch table, about 10 minutes of work."""

import re
import subprocess
from pathlib import Path

import pytest

from bench import digit_clip, scaling, vs_diffusers
from tests.conftest import REPO


def refusal(parse, argv, capsys) -> str:
    """What ``parse(argv)`` said when it stopped (SystemExit): its message and what it printed."""
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    captured = capsys.readouterr()
    return str(exc.value) + captured.out + captured.err


@pytest.mark.parametrize("argv, message", [
    (["--help"], "usage:"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--repeats", "2"], "--repeats, --only and --batch go with --levers"),
    (["--batch", "64"], "--repeats, --only and --batch go with --levers"),
    (["--levers", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["--levers", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["--levers", "--dataset", "mnist"], "not allowed with argument"),
])
def test_scaling_refuses_bad_arguments(argv, message, capsys):
    assert message in refusal(scaling.parse_args, argv, capsys)


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


@pytest.mark.parametrize("argv, message", [
    (["--out", "X", "--draw", "dpm++2m:10"], "--draw 'dpm++2m:10': expected SAMPLER:STEPS@W/LO-HI"),
    (["--out", "X", "--draw", "dpm++2m:10@0.6/0.5-0.2"], "--draw: need 0 <= LO <= HI <= 1"),
    (["--out", "X", "--seeds", "0,one"], "--seeds: expected comma-separated integers"),
    (["--out", "X", "--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["--out", "X", "--set", "train.epochs=-1"], "train.epochs"),
    (["--out", "X", "--isa", "sse2"], "invalid choice: 'sse2'"),
])
def test_seeds_refuses_bad_arguments_before_training(argv, message, capsys):
    from bench import seeds

    assert message in refusal(seeds.parse_args, argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--layouts", "2"], "--layouts: expected PROCESSESxTHREADS such as 2x1, got '2'"),
    (["--layouts", "1x2,0x1"], "--layouts: processes and threads must be >= 1, got '0x1'"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--isa", "sse2"], "invalid choice: 'sse2'"),
])
def test_processes_refuses_bad_arguments_before_training(argv, message, capsys):
    from bench import processes

    assert message in refusal(processes.parse_args, argv, capsys)


def test_processes_reads_layouts_as_processes_by_threads():
    from bench import processes

    assert processes.parse_args(["--layouts", "1x2,2x1,4X2"]).layout_list == [(1, 2), (2, 1), (4, 2)]


def test_seeds_defaults_to_params_yaml_sampler_settings():
    from bench import seeds
    from diffusion_core.config import load_config

    s = load_config("params.yaml").sample
    args = seeds.parse_args(["--out", "X"])
    assert args.seed_list == [0, 1, 2]
    assert seeds.parse_draw(args.draw[0]) == {"sampler": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale,
                                              "guidance_interval": tuple(s.guidance_interval)}


def test_isa_avx2_holds_torch_to_avx2_and_the_machine_line_says_so():
    """--isa avx2 (time_to_quality, scaling, seeds): a process started with isa_env('avx2') runs
    ATen's AVX2 kernels, and the benchmarks' machine line names the CPU's flags and that capability."""
    from bench.common import cpu_flags, isa_env, machine

    if "avx2" not in cpu_flags():
        pytest.skip("this CPU has no AVX2 (or no /proc/cpuinfo): nothing to hold torch to")
    assert isa_env("avx2") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert isa_env("native") == {}
    line = machine("avx2")
    assert "torch's CPU capability AVX2 (held: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2)" in line
    assert "flags " in line and "avx2" in line.split("flags ", 1)[1]


@pytest.mark.parametrize("argv, message", [
    (["--model", "no/such/model.pt"], "--model no/such/model.pt: not found"),
    (["--images", "0"], "--images and --rounds must be >= 1"),
    (["--draw", "ddim@0.5"], "expected SAMPLER:STEPS@W/LO-HI"),
])
def test_sample_speed_refuses_bad_arguments_before_sampling(argv, message, monkeypatch):
    from bench import sample_speed

    monkeypatch.setattr(sample_speed.subprocess, "run", lambda *a, **k: pytest.fail("a row ran"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        sample_speed.main(argv)


def test_mnist_judge_model_needs_a_model_file_and_a_draw_before_any_work(tmp_path):
    """bench/mnist_judge.py --model judges a kept pipeline again; a missing file or no --draw is one line, no judge trained."""
    import subprocess
    import sys

    for argv in (["--model", str(tmp_path / "model.pt"), "--draw", "dpm++2m:6@2/0-0.5"], ["--model", __file__]):
        res = subprocess.run([sys.executable, "bench/mnist_judge.py", "--dataset", "cifar10", *argv], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "needs an existing model.pt, at least one --draw" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_time_to_quality_times_one_dvc_repro_stage_by_stage(tmp_path):
    """bench/time_to_quality.py times the whole pipeline as one `dvc repro` (DVC starts once, as for
    a user), splitting it at DVC's "Running stage" lines; a run where a stage was up to date is
    refused, since its time would say nothing."""
    import os
    import shutil
    import sys

    import yaml

    from bench import time_to_quality as ttq

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    stages, prev = {}, None
    for name in ttq.STAGES:  # a chain, each stage sleeping a little: the split must follow DVC's lines
        stages[name] = {"cmd": f"python -c \"import time; time.sleep(0.3); open('{name}.out', 'w').write('x')\"",
                        "outs": [f"{name}.out"], **({"deps": [f"{prev}.out"]} if prev else {})}
        prev = name
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run([dvc, "init", "-q", "--no-scm"], cwd=tmp_path, check=True, capture_output=True)
    env = {**os.environ, "PATH": f"{Path(dvc).parent}:{os.environ['PATH']}"}
    times = ttq.timed_repro(tmp_path, env)
    assert list(times) == [ttq.STARTUP, *ttq.STAGES]
    assert all(times[s] >= 0.3 for s in ttq.STAGES) and times[ttq.STARTUP] > 0
    with pytest.raises(SystemExit, match="not every stage"):
        ttq.timed_repro(tmp_path, env)  # all up to date now
    assert list(ttq.timed_repro(tmp_path, env, force=True)) == [ttq.STARTUP, *ttq.STAGES]
