"""bench/gpu.py, the prepared GPU benchmark, run end to end on the CPU with a tiny network.

It is written to run once on a lent GPU machine where there may be no time for a second try, so
every path of it runs here first: both networks, the parts, the time budget, and its errors.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from bench import gpu
from diffusion_core.clip_eval import frechet_distance
from tests.conftest import REPO

TINY = ["--set", "model.base_channels=8", "--set", "model.norm_groups=4", "--set", "model.num_heads=2",
        "--set", "model.num_res_blocks=1", "--set", "train.grid_every=100", "--set", "data.limit=600",
        "--set", "train.compile=false"]  # auto compiles on an AMX CPU: ~30 s per new shape


def centroid_judge(split: dict, test: dict):
    """A real, cheap judge for the test: nearest class mean of 7x7-pooled digits; FD in that space
    against the real test digits (and between two halves of the training digits, the floor)."""
    def feats(images):
        return F.avg_pool2d(images.float().reshape(len(images), 1, 28, 28) / 255, 4).flatten(1)

    f, y = feats(split["images"]), split["labels"]
    means = torch.stack([f[y == c].mean(0) for c in range(10)])
    real = feats(test["images"])

    def evaluate(images, labels):
        x = feats(images)
        pred = torch.cdist(x, means).argmin(1)
        per = [float((pred[labels == c] == c).float().mean()) for c in range(10)]
        n = len(labels)
        return {"accuracy": float((pred == labels).float().mean()), "worst_digit": int(torch.tensor(per).argmin()),
                "worst_digit_accuracy": min(per), "fd": frechet_distance(x, real[:n]),
                "fd_real_vs_real": frechet_distance(f[:n], real[:n])}

    return evaluate


def test_readme_gpu_preset_is_the_benchmarks():
    """docs/scaling.md's "Full MNIST on a GPU" command and GPU_PRESET name the same settings."""
    text = (REPO / "docs" / "scaling.md").read_text()
    block = text[text.index("### Full MNIST on a GPU"):]
    block = block[block.index("```bash"): block.index("```", block.index("```bash") + 3)]
    flags = dict(re.findall(r"-S ([\w.]+)=('[^']*'|\S+)", block))
    import yaml

    readme = {k: yaml.safe_load(v.strip("'")) for k, v in flags.items()}
    assert {k: readme.get(k) for k in gpu.GPU_PRESET} == gpu.GPU_PRESET
    assert readme["data.source"] == "mnist" and readme["train.epochs"] == gpu.PRESET_EPOCHS


def test_budget_epochs():
    assert gpu.budget_epochs(100, 10, 100) == 10  # 1,000 steps fit: 10 epochs of 100
    assert gpu.budget_epochs(100, 10, 300) == 3  # whole epochs only
    assert gpu.budget_epochs(1, 10, 1000) == 1  # at least one
    assert gpu.budget_epochs(1e6, 10, 100) == gpu.PRESET_EPOCHS  # at most the preset's


def test_targets_count_float32_fractions_as_met():
    per_digit = torch.tensor([19 / 20], dtype=torch.float32).item()  # 0.949999988...
    assert per_digit < 0.95 and gpu.meets_targets({"accuracy": 0.98, "worst_digit_accuracy": per_digit})
    assert not gpu.meets_targets({"accuracy": 0.98, "worst_digit_accuracy": 0.9499})
    assert not gpu.meets_targets({"accuracy": 0.9799, "worst_digit_accuracy": 1.0})


def test_gpu_bench_runs_every_part_on_cpu(mnist5k, tmp_path, capsys):
    out = tmp_path / "gpu.md"
    args = ["--device", "cpu", "--source", "mnist-5k", "--batch-sizes", "16", "--steps", "2", "--timings", "1",
            "--budget-s", "1.5", "--per-class", "2", "--final-per-class", "3", "--out", str(out),
            "--parts", "throughput,quality", *TINY]  # compile: the Trainer's compile path is tested in test_precision
    gpu.main(args, evaluate=centroid_judge(mnist5k["train"], mnist5k["test"]))
    printed = capsys.readouterr().out
    text = out.read_text()
    assert printed.strip() == text.strip()
    assert "Machine: no GPU" in text and "Command: `python bench/gpu.py --device cpu" in text
    assert "Data: mnist-5k, 600 training digits" in text

    def table(title):
        lines = text[text.index(title):].splitlines()[2:]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("|"))]]
        return [dict(zip(rows[0], r)) for r in rows[2:]]

    speed = table("### Throughput")
    assert [(r["network"], r["variant"], r["batch"]) for r in speed] == [
        ("default", "batch 16", "16"), ("gpu-preset", "batch 16", "16"), ("default", "fp32 (TF32)", "32"),
        ("gpu-preset", "fp32 (TF32)", "128")]
    assert all(float(r["images_per_s"]) > 0 and r["peak_mem_mib"] == "n/a" for r in speed)
    assert [r["runs_as"] for r in speed] == ["bf16, eager"] * 2 + ["fp32, eager"] * 2  # part 1 pins eager
    assert "error" not in speed[0]

    final = {r["network"]: r for r in table("### Final samples")}
    assert set(final) == {"default", "gpu-preset"}
    for network in ("default", "gpu-preset"):
        epochs = table(f"### Time to quality: {network}")
        assert [int(r["epoch"]) for r in epochs] == list(range(1, int(final[network]["epochs"]) + 1))
        times = [float(r["train_s"]) for r in epochs]
        assert times == sorted(times) and all(t > 0 for t in times)
        assert all(0 <= float(r["accuracy"]) <= 1 and r["targets_met"] in ("True", "False") for r in epochs)
        assert int(final[network]["digits"]) == 30 and float(final[network]["fd"]) > 0
    # the preset trains at its own batch size, 128: 600 // 128 = 4 steps an epoch
    assert final["gpu-preset"]["batch"] == "128" and final["default"]["runs_as"] == "fp32, eager"  # TINY: compile off
    assert int(final["gpu-preset"]["steps"]) == 4 * int(final["gpu-preset"]["epochs"])
    assert "### torch.compile" not in text
    runs = gpu.compile_runs(gpu.parse_args(["--compile-modes", "reduce-overhead"]))
    assert runs == [(n, "torch.compile reduce-overhead", {"train.compile": True, "train.compile_mode": "reduce-overhead"})
                    for n in ("default", "gpu-preset")]
    assert [v for _, v, _ in gpu.compile_runs(gpu.parse_args(["--compile-modes", "default,reduce-overhead"]))] == (
        ["torch.compile default"] * 2 + ["torch.compile reduce-overhead"] * 2)
    assert gpu.parse_args([]).compile_modes == ["reduce-overhead"]  # what auto resolves to on one GPU


def test_gpu_bench_failed_row_does_not_stop_the_run(mnist5k, capsys, monkeypatch):
    """A row that fails is a row with its error; the rows after it are still timed."""
    real = gpu.throughput_row

    def flaky(cfg, *a):
        if cfg.model.patch_size == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, *a)

    monkeypatch.setattr(gpu, "throughput_row", flaky)
    gpu.main(["--device", "cpu", "--source", "mnist-5k", "--batch-sizes", "16", "--steps", "1", "--timings", "1",
              "--parts", "throughput", *TINY])
    out = capsys.readouterr().out
    assert re.search(r"\| gpu-preset \| batch 16 \|( +\|){7} RuntimeError: CUDA out of memory \(simulated\) \|", out)
    assert re.search(r"\| default \| batch 16 \| bf16, eager \| \d+ \| 16 \|", out)


@pytest.mark.parametrize("argv, message", [
    (["--networks", "default,huge"], "--networks: unknown ['huge']"),
    (["--batch-sizes", "32,big"], "--batch-sizes: expected integers"),
    (["--parts", "speed"], "--parts: expected some of throughput, compile, quality"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--compile-modes", "fast"], "--compile-modes: expected some of auto, default, cpp-wrapper, reduce-overhead"),
    (["--set", "train.lr"], "--set: expected KEY=VALUE"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
])
def test_gpu_bench_bad_arguments_stop_before_any_work(argv, message, tmp_path):
    out = tmp_path / "gpu.md"
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--source", "mnist-5k", "--out", str(out), *argv])
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1
    assert not out.exists()
