"""Training, checkpoints and exact resume on small real data."""

import pickle

import pytest
import torch

from diffusion_core.checkpoint import CheckpointError, load_file, load_model
from diffusion_core.data import DATASETS
from diffusion_core.trainer import Trainer, TrainingDiverged

from conftest import tiny_config

INFO = {"channels": 1, "size": 28, "class_names": list(DATASETS["mnist-5k"].class_names)}


def small(splits, n_train=96, n_val=64):
    return ({k: v[:n_train] for k, v in splits["train"].items()}, {k: v[:n_val] for k, v in splits["val"].items()})


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_mid_run_gives_the_same_weights_as_an_uninterrupted_run(mnist5k, tmp_path, optimizer):
    cfg = tiny_config(train={"epochs": 3, "checkpoint_every": 4, "cond_drop_prob": 0.3, "optimizer": optimizer}, model={"dropout": 0.1})
    train, val = small(mnist5k)  # 96 images / batch 16 = 6 steps per epoch, 18 in all
    full = Trainer(cfg, train, val, INFO, tmp_path / "a", progress=False)
    res_full = full.fit(resume=False)
    assert res_full.steps == 18

    first = Trainer(cfg, train, val, INFO, tmp_path / "b", progress=False)
    first.fit(resume=False, stop_after=8)  # mid-epoch 2; checkpoint written at step 8
    assert load_file(tmp_path / "b" / "checkpoint.pt", "training checkpoint")["step"] == 8
    del first
    torch.manual_seed(1234)  # a fresh process: global RNG elsewhere
    resumed = Trainer(cfg, train, val, INFO, tmp_path / "b", progress=False)
    res_resumed = resumed.fit(resume=True)
    assert res_resumed.steps == 18
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in res_full.history.train] == [r["loss"] for r in res_resumed.history.train]
    assert res_full.final_val_loss == res_resumed.final_val_loss


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_few_hundred_steps_lower_the_validation_loss(mnist5k, tmp_path, optimizer):
    cfg = tiny_config(diffusion={"prediction": "eps"}, train={"epochs": 1, "batch_size": 16, "lr": 3e-3, "ema_decay": 0.99, "optimizer": optimizer})
    train = {k: v[:3200] for k, v in mnist5k["train"].items()}  # 200 steps
    val = {k: v[:200] for k, v in mnist5k["val"].items()}
    tr = Trainer(cfg, train, val, INFO, tmp_path, progress=False)
    before, _ = tr.validation_loss(tr.ema.module)
    res = tr.fit(resume=False)
    assert res.steps == 200
    assert res.final_val_loss < 0.6 * before, (before, res.final_val_loss)
    assert (tmp_path / "grids" / "epoch_001.png").is_file()
    # the shipped model file samples with the same network
    model, diffusion, cfg2, info, meta = load_model(tmp_path / "model.pt")
    assert meta["steps"] == 200 and cfg2 == cfg and info == INFO
    assert not any(len(r) != 4 for r in res.history.train)
    assert len(res.val_loss_by_timestep) == 10
    # high-noise bins are easier for eps-prediction than the cleanest bin
    assert res.val_loss_by_timestep[0] > res.val_loss_by_timestep[-1]


def test_a_train_step_reads_nothing_back_from_the_device_and_fit_reads_losses_in_blocks(mnist5k, tmp_path, monkeypatch):
    """On a GPU each value read back (.item(), float(), bool(), int()) waits for all queued work.
    A step reads none: the loss stays on the device, the EMA's count is the trainer's step. fit()
    reads the losses every LOSS_READ_EVERY steps and before checkpoints; the records are complete,
    in order, and carry the learning rate each step used."""
    from diffusion_core.optim import lr_lambda

    cfg = tiny_config(train={"epochs": 2, "warmup_steps": 5, "checkpoint_every": 1000})
    train, val = small(mnist5k, n_train=16 * 30)  # 30 steps per epoch
    seen = []
    tr = Trainer(cfg, train, val, INFO, tmp_path, progress=False, on_step=lambda step, rec: seen.append(step))
    x, y = tr.x_train[:16], tr.y_train[:16]
    tr._train_step(x, y)  # the first step (the EMA's copy)
    from host_sync_guard import host_reads  # .item(), .cpu(), .numpy(), nonzero, boolean masks, ... (its own tests: test_precision.py)

    with host_reads() as reads:
        losses = [tr._train_step(x, y) for _ in range(3)]
    assert reads == [] and all(torch.is_tensor(v) and v.dim() == 0 for v in losses)
    assert int(tr.ema.n_averaged) == tr.step == 4

    tr = Trainer(cfg, train, val, INFO, tmp_path / "fit", progress=False, on_step=lambda step, rec: seen.append(step))
    seen.clear()
    reads = []
    read = Trainer._record_losses
    monkeypatch.setattr(Trainer, "_record_losses", lambda self, pending: (reads.append(pending[-1][0]), read(self, pending))[1])
    res = tr.fit(resume=False)
    assert reads == [25, 30, 55, 60]  # every 25 steps, and at each epoch's end (its checkpoint)
    assert seen == [r["step"] for r in res.history.train] == list(range(1, 61))
    f = lr_lambda(5, 60, cfg.train.lr_schedule)
    assert [r["lr"] for r in res.history.train[:7]] == pytest.approx([cfg.train.lr * f(s) for s in range(7)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_train_step_never_waits_for_the_gpu(mnist5k, tmp_path):
    """The same on CUDA, where it matters, with the product's diffusion settings (v-prediction,
    logit-normal t, label dropout) on a tiny network: torch's sync debug mode raises on any
    operation that makes the host wait for the device."""
    from diffusion_core.config import load_config
    from tiny_params import TINY_OVERRIDES

    cfg = load_config("params.yaml", {**TINY_OVERRIDES, "train.device": "cuda", "train.cond_drop_prob": 0.2})
    train, val = small(mnist5k)
    tr = Trainer(cfg, train, val, INFO, tmp_path, progress=False)
    x, y = tr.x_train[: tr.batch_size], tr.y_train[: tr.batch_size]
    tr._train_step(x, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [tr._train_step(x, y) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(v.is_cuda for v in losses) and tr.step == 4


def test_grids_are_drawn_after_the_first_every_nth_and_the_last_epoch(mnist5k, tmp_path):
    cfg = tiny_config(train={"epochs": 5, "grid_every": 2})
    train, val = small(mnist5k, n_train=32)  # 2 steps per epoch
    seen = []
    tr = Trainer(cfg, train, val, INFO, tmp_path, progress=False, on_epoch=lambda e, rec, grid: seen.append((e, grid)))
    tr.fit(resume=False)
    assert [(e, g.name if g else None) for e, g in seen] == [
        (1, "epoch_001.png"), (2, "epoch_002.png"), (3, None), (4, "epoch_004.png"), (5, "epoch_005.png")]
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["epoch_001.png", "epoch_002.png", "epoch_004.png", "epoch_005.png"]
    assert len(tr.history.val) == 5  # the validation loss is still measured after every epoch
    with pytest.raises(Exception, match="train.grid_every must be >= 1, got 0"):
        tiny_config(train={"grid_every": 0})


def test_a_compiled_run_says_it_is_compiling_before_the_first_step(mnist5k, tmp_path, capsys):
    """The first compiled step takes about a minute on a fresh machine; the bar says why it stands at 0."""
    train, val = small(mnist5k, n_train=32)
    for compiled in (False, True):
        tr = Trainer(tiny_config(train={"epochs": 1}), train, val, INFO, tmp_path / str(compiled), progress=True)
        tr.compiled = compiled  # only the message is under test: the network itself stays eager
        tr.fit(resume=False)
        err = capsys.readouterr().err
        assert ("compiling the network" in err) is compiled
        assert "train" in err


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(mnist5k, tmp_path):
    cfg = tiny_config(train={"epochs": 2, "checkpoint_every": 2})
    train, val = small(mnist5k)
    tr = Trainer(cfg, train, val, INFO, tmp_path, progress=False)
    tr.fit(resume=False, stop_after=4)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        tr.fit(resume=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_bad_checkpoints_are_refused_with_the_file_named(mnist5k, tmp_path):
    cfg = tiny_config()
    train, val = small(mnist5k)
    tr = Trainer(cfg, train, val, INFO, tmp_path, progress=False)
    tr.fit(resume=False, stop_after=1)
    tr.save_checkpoint()
    ckpt = tmp_path / "checkpoint.pt"

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_file(truncated, "training checkpoint")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    crafted = tmp_path / "crafted.pt"
    torch.save({"format": 1, "config": {}, "payload": Evil()}, crafted)
    with pytest.raises(CheckpointError, match="crafted.pt"):
        load_file(crafted, "training checkpoint")
    crafted.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="crafted.pt"):
        load_file(crafted, "training checkpoint")

    other = Trainer(tiny_config(model={"base_channels": 16}), train, val, INFO, tmp_path / "o", progress=False)
    with pytest.raises(CheckpointError, match="model.base_channels=8"):
        other.load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "missing.pt", "model file")


def test_a_checkpoint_from_other_settings_or_code_is_not_resumed(mnist5k, tmp_path):
    cfg = tiny_config()
    train, val = small(mnist5k)
    tr = Trainer(cfg, train, val, INFO, tmp_path, progress=False)
    tr.fit(resume=False, stop_after=2)
    tr.save_checkpoint()
    assert tr.resume_mismatch() is None
    # sampling or tracking-only settings do not block a resume; training settings do
    assert Trainer(tiny_config(sample={"steps": 7}, train={"checkpoint_every": 3}), train, val, INFO, tmp_path, progress=False).resume_mismatch() is None
    assert "train.lr" in Trainer(tiny_config(train={"lr": 1e-4}), train, val, INFO, tmp_path, progress=False).resume_mismatch()
    obj = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    obj["code"] = "0" * 16
    torch.save(obj, tmp_path / "checkpoint.pt")
    assert "other training code" in tr.resume_mismatch()


@pytest.mark.parametrize("conditioning", ["add", "silu_add"])
def test_model_files_from_before_model_conditioning_load_as_add(tmp_path, conditioning):
    """A model file written before ``model.conditioning`` existed has no such key: its blocks added
    the embedding linearly, and it loads that way whatever today's default is. Files that name their
    conditioning load with it (silu_add has the same weight shapes, so only the key tells them apart)."""
    from diffusion_core.checkpoint import build_model, save_model

    cfg = tiny_config(model={"conditioning": conditioning})
    model, _ = build_model(cfg, INFO)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    save_model(tmp_path / "model.pt", model.state_dict(), cfg, INFO, {"steps": 1})
    obj = torch.load(tmp_path / "model.pt", weights_only=True)
    loaded, _, cfg2, _, _ = load_model(tmp_path / "model.pt")
    assert cfg2.model.conditioning == conditioning and loaded.mid1.conditioning == conditioning
    del obj["config"]["model"]["conditioning"]  # as the older code wrote it
    torch.save(obj, tmp_path / "old.pt")
    old, _, cfg_old, _, _ = load_model(tmp_path / "old.pt")
    assert cfg_old.model.conditioning == "add" and old.mid1.conditioning == "add"
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 70]), torch.tensor([1, 10])
    with torch.no_grad():
        same = torch.allclose(old(x, t, y), loaded(x, t, y))
    assert same == (conditioning == "add")


def test_model_files_from_before_patch_size_and_t_sampling_load_as_they_were_trained(tmp_path):
    """Files from before ``model.patch_size`` and ``diffusion.t_sampling`` existed ran at full
    resolution and drew t uniformly; they load so (and say so), although the defaults are now 2
    and logit_normal."""
    from diffusion_core.checkpoint import build_model, save_model

    cfg = tiny_config(model={"patch_size": 1}, diffusion={"t_sampling": "uniform"})
    model, _ = build_model(cfg, INFO)
    save_model(tmp_path / "model.pt", model.state_dict(), cfg, INFO, {"steps": 1})
    obj = torch.load(tmp_path / "model.pt", weights_only=True)
    del obj["config"]["model"]["patch_size"], obj["config"]["diffusion"]["t_sampling"]  # as the older code wrote it
    torch.save(obj, tmp_path / "old.pt")
    old, _, cfg_old, _, _ = load_model(tmp_path / "old.pt")
    assert tiny_config().model.patch_size == 2 and tiny_config().diffusion.t_sampling == "logit_normal"
    assert cfg_old.model.patch_size == 1 and cfg_old.diffusion.t_sampling == "uniform"
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 70]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(old(x, t, y), model.eval()(x, t, y))


def test_adam_beta2_reaches_the_optimizer_and_a_change_starts_over(mnist5k, tmp_path):
    train, val = small(mnist5k)
    tr = Trainer(tiny_config(train={"adam_beta2": 0.99, "checkpoint_every": 1}), train, val, INFO, tmp_path, progress=False)
    assert tr.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    tr.fit(resume=False, stop_after=2)
    other = Trainer(tiny_config(), train, val, INFO, tmp_path, progress=False)
    assert other.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert "train.adam_beta2" in other.resume_mismatch()


def test_a_checkpoint_trained_with_another_optimizer_starts_over(mnist5k, tmp_path):
    train, val = small(mnist5k)
    tr = Trainer(tiny_config(train={"optimizer": "muon", "checkpoint_every": 1}), train, val, INFO, tmp_path, progress=False)
    tr.fit(resume=False, stop_after=2)
    assert {"momentum_buffer"} in [set(s) for s in tr.optimizer.state.values()]
    assert "train.optimizer" in Trainer(tiny_config(train={"optimizer": "adamw"}), train, val, INFO, tmp_path, progress=False).resume_mismatch()
    assert "train.muon_lr" in Trainer(tiny_config(train={"optimizer": "muon", "muon_lr": 0.02}), train, val, INFO, tmp_path,
                                      progress=False).resume_mismatch()
