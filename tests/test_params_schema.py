"""Every key of params.yaml refused at its edges (property-based, Hypothesis): generated bad values of
every class (wrong type, out of range, NaN and infinity, empty or unknown strings, empty lists,
repeats) each stop validation with one line that names the key; the smallest allowed value (and the
largest where no other key limits it) passes. A few real stage runs check the same from the command
line: exit 2, one `error:` line, no traceback, and no file of the project touched."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion_core.config import INT_MAX, ConfigError, apply_overrides, config_from_dict, declared_fields

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())
FIELDS = {key: (tp, f) for key, tp, f in declared_fields()}
NUMBERS = (int, float)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def bounds(rule: str | None) -> tuple[float | None, bool, float | None, bool]:
    """A rule -> (low, low included, high, high included); None where unbounded."""
    if not rule:
        return None, True, None, True
    if rule.startswith(">="):
        return float(rule[2:]), True, None, True
    if rule.startswith(">"):
        return float(rule[1:]), False, None, True
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    return lo, rule[0] == "[", hi, rule[-1] == "]"


def not_float_text() -> st.SearchStrategy:
    def parses(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    return st.text(max_size=8).filter(lambda s: not parses(s))


def out_of_range(scalar: type, rule: str | None) -> st.SearchStrategy | None:
    """Values of the right type that break ``rule`` (integers also above INT_MAX)."""
    lo, lo_in, hi, hi_in = bounds(rule)
    options = []
    if scalar is int:
        options.append(st.integers(min_value=INT_MAX + 1, max_value=2**70))
        if lo is not None:
            options.append(st.integers(max_value=math.ceil(lo) - 1 if lo_in else math.floor(lo), min_value=-(2**40)))
        if hi is not None:
            options.append(st.integers(min_value=math.floor(hi) + 1 if hi_in else math.ceil(hi), max_value=2**40))
    elif scalar is float:
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
        if lo is not None:
            options.append(st.floats(max_value=lo, exclude_max=lo_in, min_value=-1e12, allow_nan=False))
        if hi is not None:
            options.append(st.floats(min_value=hi, exclude_min=hi_in, max_value=1e12, allow_nan=False))
    return st.one_of(options) if options else None


def wrong_type(tp: typing.Any) -> st.SearchStrategy:
    """Values YAML can hold that the annotation ``tp`` does not accept."""
    if tp is int:
        return st.one_of(st.text(max_size=8), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
    if tp is float:
        return st.one_of(not_float_text(), st.booleans(), st.none(), st.lists(st.floats(), max_size=2))
    if tp is bool:
        return st.one_of(st.text(max_size=8), st.integers(), st.none(), st.floats(allow_nan=False))
    if tp is str:
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.text(), max_size=2))
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):  # bool | str
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.lists(st.booleans(), max_size=2))
    return st.one_of(st.text(max_size=8), st.integers(), st.none())  # a list's value given as a scalar


def bad_values(key: str) -> st.SearchStrategy:
    """Every class of bad value for ``key``."""
    tp, f = FIELDS[key]
    choices, rule = f.metadata.get("choices"), f.metadata.get("rule")
    options = [wrong_type(tp)]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        good = {int: st.integers(1, 4), float: st.floats(0, 1), str: st.sampled_from(BASE_ITEMS.get(key, ["x"]))}[item]
        options.append(st.lists(wrong_type(item), min_size=1, max_size=3))
        if out_of_range(item, rule) is not None:
            options.append(st.lists(out_of_range(item, rule), min_size=1, max_size=3))
        if item is str:
            options.append(st.lists(st.sampled_from(["", "  "]), min_size=1, max_size=2))
        if f.metadata.get("min_items"):
            options.append(st.just([]))
        if f.metadata.get("unique"):
            options.append(st.lists(good, min_size=1, max_size=3).map(lambda xs: xs + xs[:1]))
        return st.one_of(options)
    if choices:
        options.append(st.text(max_size=12).filter(lambda s: s not in choices))
    elif tp is str:
        options.append(st.sampled_from(["", " ", "\t"]))
    if tp in NUMBERS and out_of_range(tp, rule) is not None:
        options.append(out_of_range(tp, rule))
    if key == "train.device":
        options.append(st.text(max_size=10).filter(lambda s: s not in ("auto", "cpu", "cuda") and not (s.startswith("cuda:") and s[5:].isdigit())))
    return st.one_of(options)


BASE_ITEMS = {"clip.models": ["digit-clip"], "sweep.samplers": ["ddim:10", "dpm++2m:20"]}


def refused(key: str, value) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(apply_overrides(yaml.safe_load(yaml.safe_dump(BASE)), {key: value}))
    return str(err.value)


@SETTINGS
@given(st.data())
def test_every_key_refuses_every_class_of_bad_value_with_one_line_naming_it(data):
    key = data.draw(st.sampled_from(sorted(FIELDS)), label="key")
    value = data.draw(bad_values(key), label="value")
    message = refused(key, value)
    assert "\n" not in message
    assert message.startswith((key + " ", f"{key}[", f"{key}:", f"unknown key '{key}")) or f" {key} " in f" {message} ", message


# The values of other keys that the smallest or largest value of a key needs (a rule that ties keys).
COMPANIONS = {"model.base_channels": {"model.norm_groups": 1, "model.num_heads": 1},
              "model.norm_groups": {"model.norm_groups": 1}, "diffusion.beta_end": {"diffusion.beta_start": 5e-10}, "model.num_heads": {"model.num_heads": 1},
              "diffusion.timesteps": {"sample.steps": 2, "train.grid_steps": 2, "sweep.samplers": ["ddim:2"]}}
# Keys whose largest value another key bounds: (key, why).
UPPER_LIMITED = {"data.val_fraction": "val + test < 1", "data.test_fraction": "val + test < 1",
                 "diffusion.beta_start": "below diffusion.beta_end", "diffusion.beta_end": "above diffusion.beta_start",
                 "train.grid_steps": "at most diffusion.timesteps", "sample.steps": "at most diffusion.timesteps",
                 "model.patch_size": "divides the image size", "clip.digit_clip_patch_grid": "divides the image size",
                 "clip.digit_clip_width": "a multiple of 16", "model.base_channels": "divisible by norm_groups and num_heads",
                 "model.norm_groups": "divides every width", "model.num_heads": "divides every width",
                 "model.channel_mult": "halving the feature maps", "data.image_size": "divisible by the patch size and CLIP's patch grid", "model.attention_resolutions": "a resolution of the network"}


def edges(key: str) -> list:
    tp, f = FIELDS[key]
    scalar = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    lo, lo_in, hi, hi_in = bounds(f.metadata.get("rule"))
    if scalar not in NUMBERS or lo is None:
        return []
    step = 1 if scalar is int else 1e-9
    low = lo if lo_in else lo + step
    high = (hi if hi_in else hi - step) if hi is not None else (INT_MAX if scalar is int else 1e12)
    out = [scalar(low)] + ([] if key in UPPER_LIMITED else [scalar(high)])
    if typing.get_origin(tp) is not list:
        return out
    n = 1 if f.metadata.get("unique") else len(f.default_factory())  # every item at the edge
    return [[v] * n for v in out]


@pytest.mark.parametrize("key", [k for k in FIELDS if edges(k)])
def test_the_edges_of_every_range_are_accepted(key):
    if key == "model.attention_resolutions":
        pytest.skip("its items must be resolutions of the network (7 or 14 here), not any positive size")
    for value in edges(key):
        raw = apply_overrides(yaml.safe_load(yaml.safe_dump(BASE)), {**COMPANIONS.get(key, {}), key: value})
        cfg = config_from_dict(raw)
        assert cfg.flat()[key] == value


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage, key, value", [
    ("prepare", "data.limit", -1),
    ("train", "train.lr", math.nan),
    ("sample", "sample.per_class", 2**40),
    ("evaluate", "clip.models", []),
    ("sweep", "sweep.samplers", ["ddim:10", "ddim:10"]),
    ("sample", "sample.per_class", 10**8),  # valid alone, but 10^9 digits cannot fit: refused before the model loads
    ("sweep", "sweep.per_class", 10**8),
])
def test_a_stage_run_with_a_bad_key_exits_2_with_one_line_and_touches_nothing(tmp_path, stage, key, value):
    from tiny_params import copy_project

    env = copy_project(tmp_path)
    params = apply_overrides(yaml.safe_load((tmp_path / "params.yaml").read_text()), {key: value})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"an earlier output")
    before = tree_digest(tmp_path)
    res = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert tree_digest(tmp_path) == before


def test_an_unexpected_failure_is_one_line_with_the_stage_and_type_and_a_traceback_on_request(tmp_path, monkeypatch, capsys):
    import stages.prepare as prepare

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(BASE))

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero in a loader")

    monkeypatch.setattr(prepare, "build_dataset", boom)
    monkeypatch.delenv("DIFFUSION_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        prepare.main(params=tmp_path / "params.yaml", out=tmp_path / "out")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: prepare: ZeroDivisionError: division by zero in a loader (set DIFFUSION_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("DIFFUSION_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        prepare.main(params=tmp_path / "params.yaml", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_work_that_cannot_fit_is_refused_with_the_key_the_estimate_and_the_limit(tmp_path):
    from diffusion_core import budget
    from diffusion_core.config import Config

    s = Config().sample
    needs = budget.sample_needs(s, (1, 28, 28), 10)
    images, traj = needs
    assert images.memory == 2000 * 784 * 9 and images.disk == 2000 * 784  # float32 twice + uint8; written uint8
    assert traj.memory == 2 * 11 * 160 * 784 * 10 and traj.disk == 2 * 11 * 160 * 784 * 2
    budget.check(needs, tmp_path, memory=budget.GIB, disk=budget.GIB)  # the default fits in 1 GiB
    with pytest.raises(ConfigError, match=r"^sample.trajectory_per_class=16: the trajectories of 160 images at 11 points need "
                                          r"about 26.3 MiB of memory, more than 80% of the 32.0 MiB available; lower it$"):
        budget.check(needs, tmp_path, memory=32 * 2**20, disk=budget.GIB)
    with pytest.raises(ConfigError, match=r"^sample.trajectory_per_class=16: 2,000 drawn images and the trajectories of 160 "
                                          r"images at 11 points need about 39.8 MiB of memory, more than 80% of the 48.0 MiB"):
        budget.check(needs, tmp_path, memory=48 * 2**20, disk=budget.GIB)  # each fits, together they do not
    with pytest.raises(ConfigError, match=r"^sample.trajectory_per_class=16: .* need about 5.3 MiB of disk under .*, more than 80% of the 4.0 MiB free"):
        budget.check(needs, tmp_path, memory=budget.GIB, disk=4 * 2**20)
    count = budget.drawn_images("--count", 10**7, 10**7, (3, 32, 32))
    with pytest.raises(ConfigError, match="^--count=10000000: 10,000,000 drawn images need about 257.5 GiB of memory"):
        budget.check([count], tmp_path, memory=24 * budget.GIB, disk=10**15)
    assert budget.available_memory() > 0 and budget.free_disk(tmp_path / "not" / "yet") > 0
