"""Data-parallel training (torchrun, DistributedDataParallel) on CPU with the gloo backend.

Two processes with the global batch ``train.batch_size`` compute the same maths as one process with
that batch: each rank takes positions rank, rank + 2, ... of every global batch and of the noise
drawn for it, and DDP averages the gradients. Only the order of float additions differs (per-rank
means then the all-reduce average, instead of one mean over the batch), which is ~1e-7 relative per
step; Adam and 20 steps amplify it a little. The tolerances (``ATOL`` on weights, ``LOSS_ATOL`` on
losses) are 10-30x the differences measured on a 2-core x86 CPU, and ``ATOL`` is ~1/1000 of how far
training moves the weights (checked below), so a wrong shard (a rank seeing the wrong images or
noise, a missing all-reduce) fails them by orders of magnitude. Gradients summed instead of averaged
are caught where they are made: the all-reduced gradients of single steps are compared at rtol 1e-5
(``test_all_reduced_gradients_...``), since AdamW divides most of a gradient's scale out.
"""

import csv
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, tiny_config
from diffusion_core.config import ConfigError
from diffusion_core.data import DATASETS
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.data import EpochShardSampler, epoch_permutation
from diffusion_core.trainer import Trainer
from tiny_params import write_tiny_params

# max |weights(2 processes) - weights(1 process)|, measured: 3.8e-7 (model and EMA) after the 8 steps
# of test_two_processes_match_one_..., 6.3e-7 after the train stage's 20 steps, 2.4e-7 for a 2-process
# checkpoint resumed in one process (it was 1e-4 before: ~300x the differences)
ATOL = 1e-5
# max |loss(2 processes) - loss(1 process)| per step, measured 1.2e-7 (2 float32 ulps of a loss near 0.8)
# in both tests; the final val loss differed by 0.0 (measured)
LOSS_ATOL = 2e-6
INFO = {"channels": 1, "size": 28, "class_names": list(DATASETS["mnist-5k"].class_names)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- the maths of sharding, without processes ------------------------------------------------------


def test_rank_shards_of_a_batch_are_the_single_process_batch():
    n, seed, world, b = 103, 7, 4, 5  # n not divisible: drop_last like DistributedSampler
    one = EpochShardSampler(n, seed)
    one.set_epoch(3)
    assert torch.equal(one.indices(), epoch_permutation(n, seed, 3))  # single process: unchanged order
    shards = []
    for rank in range(world):
        s = EpochShardSampler(n, seed, world, rank)
        s.set_epoch(3)
        assert list(s) == s.indices().tolist() and len(s) == n // world
        shards.append(s.indices())
    perm = epoch_permutation(n, seed, 3)
    for k in range((n // world) // b):  # k-th local batch of every rank = k-th global batch of world*b
        local = torch.stack([sh[k * b : (k + 1) * b] for sh in shards], dim=1).flatten()
        assert torch.equal(local, perm[k * b * world : (k + 1) * b * world])


def test_sharded_noise_is_the_single_process_noise():
    diff = GaussianDiffusion(timesteps=50, num_classes=10)
    x0 = torch.randn(12, 1, 8, 8)
    y = torch.randint(0, 10, (12,))
    seen = {}

    def spy(name):
        def model(x_t, t, y_):
            seen[name] = (x_t, t, y_)
            return torch.zeros_like(x_t)

        return model

    full = diff(spy("full"), x0, y, 0.5, torch.Generator().manual_seed(3))
    parts = [diff(spy(r), x0[r::3], y[r::3], 0.5, torch.Generator().manual_seed(3), shard=(r, 3)) for r in range(3)]
    for r in range(3):
        for got, want in zip(seen[r], seen["full"]):
            assert torch.equal(got, want[r::3])
    assert torch.allclose(sum(parts) / 3, full)


def test_random_flips_are_drawn_for_the_global_batch():
    """Datasets with flips (cifar10): rank r flips its images exactly as one process flips the
    positions r, r + world, ... of the global batch."""
    x = torch.randn(12, 3, 4, 4)

    def augment(rank, world, images):
        tr = Trainer.__new__(Trainer)  # only what _augment reads; no process group needed
        tr.hflip, tr.rank, tr.world, tr.flip_gen = True, rank, world, torch.Generator().manual_seed(5)
        return tr._augment(images)

    full = augment(0, 1, x)
    assert not torch.equal(full, x) and not torch.equal(full, x.flip(-1))  # some flipped, some not
    for r in range(3):
        assert torch.equal(augment(r, 3, x[r::3]), full[r::3])


def test_global_batch_not_divisible_by_the_processes_is_one_line_naming_the_param(mnist5k, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    train = {k: v[:96] for k, v in mnist5k["train"].items()}
    val = {k: v[:32] for k, v in mnist5k["val"].items()}
    with pytest.raises(ConfigError, match=r"train.batch_size is the global batch .* processes \(3\), got 16"):
        Trainer(tiny_config(), train, val, INFO, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


# -- two real processes -------------------------------------------------------------------------

# What every worker script starts with: the first n training digits and 64 validation digits.
WORKER_HEAD = """
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from diffusion_core.data import build_splits
from diffusion_core.trainer import Trainer
torch.set_num_threads(1)
splits = build_splits("mnist-5k", seed=0)
train = {{k: v[:{n}] for k, v in splits["train"].items()}}
val = {{k: v[:64] for k, v in splits["val"].items()}}
"""


def run_two_processes(body: str, base: Path, n: int, **fields) -> None:
    """Run WORKER_HEAD + ``body`` (formatted with ``fields``) as 2 torchrun processes in ``base``."""
    script = base / "worker.py"
    script.write_text((WORKER_HEAD + body).format(tests=str(REPO / "tests"), n=n, base=str(base), info=INFO, **fields))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*TORCHRUN, str(script)], cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


WORKER = """# every rank gets its own output folder: rank 1's must stay empty
out = Path({base!r}) / f"rank{{os.environ['RANK']}}"
tr = Trainer(tiny_config(**{groups!r}), train, val, {info!r}, out, progress=False)
res = tr.fit(resume=False)
assert tr.world == 2 and torch.distributed.is_initialized()
if tr.is_main:
    torch.save({{"model": tr.model.state_dict(), "ema": tr.ema.state_dict(), "loss": [r["loss"] for r in res.history.train]}}, out / "final.pt")
tr.close()
assert not torch.distributed.is_initialized()
"""


def test_two_processes_match_one_and_only_rank_0_writes(mnist5k, tmp_path):
    groups = {"train": {"epochs": 2, "batch_size": 32, "cond_drop_prob": 0.3, "checkpoint_every": 3}}
    n = 128  # 4 global batches of 32 per epoch, 8 steps
    run_two_processes(WORKER, tmp_path, n, groups=groups)
    assert not (tmp_path / "rank1").exists()
    assert {p.name for p in (tmp_path / "rank0").iterdir()} == {"checkpoint.pt", "model.pt", "grids", "final.pt"}
    ddp = torch.load(tmp_path / "rank0" / "final.pt", weights_only=True)

    train = {k: v[:n] for k, v in mnist5k["train"].items()}
    val = {k: v[:64] for k, v in mnist5k["val"].items()}
    single = Trainer(tiny_config(**groups), train, val, INFO, tmp_path / "single", progress=False)
    init = {k: v.clone() for k, v in single.model.state_dict().items()}
    losses = [r["loss"] for r in single.fit(resume=False).history.train]
    assert len(losses) == len(ddp["loss"]) == 8
    moved = max_diff(single.model.state_dict(), init)
    assert moved > 1000 * ATOL, moved  # training moved the weights (measured 1.7e-2) far beyond the tolerance the two runs must agree to
    print(f"DDP worker vs single: moved {moved:.2e}, max |dw| model {max_diff(single.model.state_dict(), ddp['model']):.2e}, "
          f"EMA {max_diff(single.ema.state_dict(), ddp['ema']):.2e}, loss {max(abs(a - b) for a, b in zip(losses, ddp['loss'])):.2e}")
    assert max_diff(single.model.state_dict(), ddp["model"]) < ATOL
    assert max_diff(single.ema.state_dict(), ddp["ema"]) < ATOL
    assert max(abs(a - b) for a, b in zip(losses, ddp["loss"])) < LOSS_ATOL
    ckpt = torch.load(tmp_path / "rank0" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


# -- one step's gradients -----------------------------------------------------------------------

# The first optimizer steps of a 2-process run: the gradients the optimizer sees (after DDP's
# all-reduce) on every rank, at each step; once with DDP's averaging, once with a comm hook that sums
# (the bug to catch). Three steps: the U-Net's zero-initialised output convolutions leave all
# gradients but theirs zero at step 1 (and 85 of 129 tensors at step 2); at step 3 every one is nonzero.
# grad_clip 0: clipping to a norm would hide a summed gradient (same direction, clipped to the same norm).
GRAD_GROUPS = {"train": {"batch_size": 32, "cond_drop_prob": 0.3, "grad_clip": 0.0}}

GRAD_WORKER = """
import torch.distributed as dist
rank = os.environ["RANK"]


def summed(state, bucket):  # all-reduce without the division by the world size
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


grads, trainers = {{}}, []
for reduction in ("mean", "sum"):
    tr = Trainer(tiny_config(**{groups!r}), train, val, {info!r}, Path({base!r}) / f"{{reduction}}{{rank}}", progress=False)
    assert tr.world == 2
    if reduction == "sum":
        tr.net.register_comm_hook(None, summed)
    got = grads[reduction] = []
    tr.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs, tr=tr, got=got: got.append({{k: p.grad.detach().clone() for k, p in tr.model.named_parameters()}}))
    tr.fit(resume=False, stop_after={steps})
    grads[reduction + " weights"] = {{k: v.clone() for k, v in tr.model.state_dict().items()}}
    trainers.append(tr)
torch.save(grads, Path({base!r}) / f"grads{{rank}}.pt")
for tr in reversed(trainers):
    tr.close()
"""


GRAD_STEPS = 3


def single_process_grads(mnist5k, n: int, out: Path) -> list[dict]:
    train = {k: v[:n] for k, v in mnist5k["train"].items()}
    val = {k: v[:64] for k, v in mnist5k["val"].items()}
    tr = Trainer(tiny_config(**GRAD_GROUPS), train, val, INFO, out, progress=False)
    assert tr.world == 1
    got = []
    tr.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: got.append({k: p.grad.detach().clone() for k, p in tr.model.named_parameters()}))
    tr.fit(resume=False, stop_after=GRAD_STEPS)
    assert len(got) == GRAD_STEPS
    return got


@pytest.fixture(scope="module")
def step_grads(mnist5k, tmp_path_factory):
    """The gradients of the first GRAD_STEPS steps: 2 processes (rank 0 and 1; averaged and summed) and 1 process."""
    base = tmp_path_factory.mktemp("grads")
    n = 64
    run_two_processes(GRAD_WORKER, base, n, groups=GRAD_GROUPS, steps=GRAD_STEPS)
    ranks = [torch.load(base / f"grads{r}.pt", weights_only=True) for r in range(2)]
    return ranks, single_process_grads(mnist5k, n, base / "single")


GRAD_RTOL = 1e-5


def assert_grads_match(got: dict, want: dict) -> None:
    """Every parameter's gradient within GRAD_RTOL, elementwise; elements near zero are held to
    GRAD_RTOL times the largest gradient of their tensor (float sums in another order differ by a
    few ulps of the summands, not of the result)."""
    assert got.keys() == want.keys() and len(want) > 10
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=GRAD_RTOL, atol=GRAD_RTOL * float(w.abs().max()), msg=lambda m: f"{k}: {m}")


def grad_tolerance_used(got: dict, want: dict) -> float:
    """The largest |got - want| / (atol + rtol |want|) of :func:`assert_grads_match` (1: at the limit)."""
    return max(float(((got[k].double() - w.double()).abs() / (GRAD_RTOL * (w.double().abs().max() + w.double().abs()))).max())
               for k, w in want.items() if w.abs().max() > 0)


def grad_rel_diff(got: dict, want: dict) -> float:
    """Max over the nonzero tensors of max |got - want| / max |want|."""
    return max(float((got[k].double() - w.double()).abs().max() / w.double().abs().max()) for k, w in want.items() if w.abs().max() > 0)


def test_all_reduced_gradients_of_two_processes_are_the_full_batch_gradients(step_grads):
    (r0, r1), single = step_grads
    assert len(r0["mean"]) == len(r1["mean"]) == len(single) == GRAD_STEPS
    for step, (g0, g1, g) in enumerate(zip(r0["mean"], r1["mean"], single), 1):
        for k in g0:  # the all-reduce leaves the same bits on every rank
            assert torch.equal(g0[k], g1[k]), (step, k)
        print(f"step {step}: 2-process vs 1-process gradients: max |dg| / max |g| {grad_rel_diff(g0, g):.2e}, "
              f"worst element at {grad_tolerance_used(g0, g):.0%} of the tolerance")
        assert_grads_match(g0, g)
    assert all(float(g.abs().max()) > 0 for g in single[-1].values())  # every parameter is checked


@pytest.mark.parametrize("how", ["summed by a comm hook", "averaged, times the world size"])
def test_summed_gradients_fail_the_gradient_check(step_grads, how):
    """The check above can fail: gradients summed over the 2 processes instead of averaged are
    twice the full-batch gradients, and the check rejects them."""
    (r0, _), single = step_grads
    summed = r0["sum"] if how == "summed by a comm hook" else [{k: 2 * g for k, g in step.items()} for step in r0["mean"]]
    for step in range(GRAD_STEPS):
        with pytest.raises(AssertionError):
            assert_grads_match(summed[step], single[step])
    # step 1 (same weights in every run): exactly the sum, nothing else
    assert_grads_match({k: g / 2 for k, g in summed[0].items()}, single[0])
    if how == "summed by a comm hook":  # AdamW divides the gradients' scale out (but near its eps): the weights show little
        print(f"after {GRAD_STEPS} steps, summed vs averaged: max |dw| {max_diff(r0['sum weights'], r0['mean weights']):.2e}")


# -- the real train stage under torchrun ---------------------------------------------------------


def project(dst: Path) -> None:
    for f in ["params.yaml", "dvc.yaml", *[str(p.relative_to(REPO)) for p in (REPO / "stages").glob("*.py")],
              *[str(p.relative_to(REPO)) for p in (REPO / "diffusion_core").glob("*.py")]]:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    write_tiny_params(REPO / "params.yaml", dst / "params.yaml")  # 320 images, global batch 32: 20 steps


def env_for(d: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(d), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def stage(cmd: list[str], d: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=d, env=env_for(d), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def mlflow_runs(d: Path) -> list[str]:
    con = sqlite3.connect(d / "mlflow.db")
    try:
        return [r for (r,) in con.execute("select run_uuid from runs")]
    finally:
        con.close()


def losses(d: Path) -> list[float]:
    with open(d / "reports/plots/train_loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def checkpoint_step(path: Path) -> int:
    from diffusion_core.checkpoint import load_file

    try:
        return int(load_file(path, "training checkpoint")["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Prepared tiny data; the train stage run once in one process and once in two."""
    root = tmp_path_factory.mktemp("ddp")
    dirs = {name: root / name for name in ("single", "ddp", "killed")}
    for d in dirs.values():
        project(d)
    stage([sys.executable, "-m", "stages.prepare"], dirs["single"])
    for name in ("ddp", "killed"):
        shutil.copytree(dirs["single"] / "data", dirs[name] / "data")
    out = {"single": stage([sys.executable, "-m", "stages.train"], dirs["single"])}
    out["ddp"] = stage([*TORCHRUN, "-m", "stages.train"], dirs["ddp"])
    return dirs, out


def init_weights(d: Path) -> dict:
    """The train stage's initial weights (what Trainer builds before its first step) for project ``d``."""
    from diffusion_core.checkpoint import build_model
    from diffusion_core.config import load_config

    torch.manual_seed(load_config(d / "params.yaml").seed)
    return build_model(load_config(d / "params.yaml"), INFO)[0].state_dict()


@pytest.mark.slow
def test_torchrun_stage_matches_single_process_with_the_same_global_batch(runs):
    dirs, out = runs
    s, d = dirs["single"], dirs["ddp"]
    ws = torch.load(s / "models/model.pt", weights_only=True)["model"]
    wd = torch.load(d / "models/model.pt", weights_only=True)["model"]
    cs = torch.load(s / "models/checkpoint.pt", weights_only=True)
    cd = torch.load(d / "models/checkpoint.pt", weights_only=True)
    assert cs["step"] == cd["step"] == 20 and cd["world_size"] == 2
    print(f"DDP vs single: max |dw| model {max_diff(cs['model'], cd['model']):.2e}, EMA {max_diff(ws, wd):.2e}, "
          f"loss {max(abs(a - b) for a, b in zip(losses(s), losses(d))):.2e}, moved {max_diff(cs['model'], init_weights(s)):.2e}")
    assert max_diff(cs["model"], init_weights(s)) > 1000 * ATOL  # training moved the weights (measured 3.0e-2)
    assert max_diff(cs["model"], cd["model"]) < ATOL
    assert max_diff(ws, wd) < ATOL  # the EMA weights in the model file
    assert len(losses(d)) == 20
    assert max(abs(a - b) for a, b in zip(losses(s), losses(d))) < LOSS_ATOL
    import json

    ms, md = (json.loads((x / "reports/metrics/train.json").read_text()) for x in (s, d))
    assert md["processes"] == 2 and ms["processes"] == 1 and md["precision"] == "fp32"
    print(f"final val loss: {abs(ms['final_val_loss'] - md['final_val_loss']):.2e}")
    assert abs(ms["final_val_loss"] - md["final_val_loss"]) < LOSS_ATOL


@pytest.mark.slow
def test_torchrun_stage_logs_and_writes_from_rank_0_only(runs):
    dirs, out = runs
    d = dirs["ddp"]
    assert len(mlflow_runs(d)) == 1
    assert out["ddp"].stdout.count("trained 20 steps on 2 processes") == 1, out["ddp"].stdout
    assert sorted(p.name for p in (d / "models").iterdir()) == ["checkpoint.pt", "grids", "model.pt", "run.json"]
    assert sorted(p.name for p in (d / "models/grids").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    con = sqlite3.connect(d / "mlflow.db")
    try:
        (run_id,) = mlflow_runs(d)
        procs = con.execute("select value from metrics where run_uuid=? and key='train/processes'", (run_id,)).fetchall()
        steps = con.execute("select count(*) from metrics where run_uuid=? and key='train/loss'", (run_id,)).fetchone()
    finally:
        con.close()
    assert procs == [(2.0,)] and steps == (20,)


@pytest.mark.slow
def test_killed_torchrun_stage_resumes_in_two_processes_and_in_one(runs, tmp_path):
    dirs, _ = runs
    k = dirs["killed"]
    ckpt = k / "models" / "checkpoint.pt"
    proc = subprocess.Popen([*TORCHRUN, "-m", "stages.train"], cwd=k, env=env_for(k), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while checkpoint_step(ckpt) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = checkpoint_step(ckpt)
    assert 8 <= killed_at < 20 and not (k / "models" / "model.pt").exists()
    shutil.copy2(ckpt, tmp_path / "checkpoint.pt")

    res = stage([*TORCHRUN, "-m", "stages.train"], k)
    assert "resuming from" in res.stdout and res.stdout.count("trained 20 steps on 2 processes") == 1
    assert len(mlflow_runs(k)) == 2  # the killed run and the resumed one: one per torchrun, not per rank
    d = dirs["ddp"]
    wk = torch.load(k / "models/model.pt", weights_only=True)["model"]
    wd = torch.load(d / "models/model.pt", weights_only=True)["model"]
    print(f"DDP killed at step {killed_at} and resumed vs uninterrupted DDP: max |dw| {max_diff(wk, wd):.2e}")
    for key in wd:  # same processes, same reduction order: the same bits
        assert torch.equal(wk[key], wd[key]), key
    assert losses(k) == losses(d)

    # the 2-process checkpoint resumed by a single process (no "module." prefixes, rank 0's RNG)
    from diffusion_core.config import load_config
    from diffusion_core.data import load_split

    cfg = load_config(k / "params.yaml")
    data = k / "data" / "prepared"
    one = Trainer(cfg, load_split(data, "train"), load_split(data, "val"), INFO, tmp_path, progress=False)
    assert one.world == 1 and one.resume_mismatch() is None
    res1 = one.fit(resume=True)
    assert res1.steps == 20 and len(res1.history.train) == 20
    cd = torch.load(d / "models/checkpoint.pt", weights_only=True)
    print(f"DDP checkpoint resumed in one process vs uninterrupted DDP: max |dw| {max_diff(one.model.state_dict(), cd['model']):.2e}")
    print(f"... EMA {max_diff(one.ema.module.state_dict(), wd):.2e}")
    assert max_diff(one.model.state_dict(), cd["model"]) < ATOL
    assert max_diff(one.ema.module.state_dict(), wd) < ATOL
