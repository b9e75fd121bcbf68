"""The layout keeps its promises: dvc.yaml names every module a stage runs, the modules form no import
cycle, docs/configuration.md is the config's own, params.yaml holds the config's defaults, the
stage -> params map has one source, and size limits hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion_core", "stages")


def module_file(name: str) -> Path | None:
    """``diffusion_core.trainer`` -> its file in this repository (None for other packages)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Modules of this repository that ``path`` imports, anywhere in the file (function-level too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if module_file(name) is not None:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    """Every module of diffusion_core/ and stages/ -> the repository modules it imports."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = {m for m in imports_of(path) if m != name}
    return out


def closure(start: str, g: dict[str, set[str]]) -> set[str]:
    """``start`` and every repository module it loads, transitively (a package's __init__ included)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += sorted(g.get(m, ()))
        if "." in m:
            todo.append(m.split(".")[0])  # importing a.b runs a/__init__.py first
    return seen


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_module_a_stage_runs_is_a_dvc_dependency_and_no_other():
    g = graph()
    for stage, spec in dvc_stages().items():
        module = spec["cmd"].split("-m ", 1)[1].split()[0]
        needed = {str(module_file(m).relative_to(REPO)) for m in closure(module, g)}
        declared = {d for d in spec["deps"] if isinstance(d, str) and d.endswith(".py")}
        assert needed - declared == set(), f"{stage}: dvc.yaml misses {sorted(needed - declared)}"
        assert declared - needed == set(), f"{stage}: dvc.yaml lists code the stage never imports: {sorted(declared - needed)}"


def test_no_import_cycles_and_no_stage_imports_another():
    g = graph()
    for module in g:
        for dep in g[module]:
            assert module not in closure(dep, g) or dep == module.split(".")[0], f"import cycle: {module} <-> {dep}"
    for module, deps in g.items():
        if module.startswith("stages.") and module != "stages._common":
            others = {d for d in deps if d.startswith("stages.") and d != "stages._common"}
            assert not others, f"{module} imports another stage: {sorted(others)}"


def test_tracking_and_the_package_load_without_torch():
    code = "import sys, diffusion_core, diffusion_core.tracking; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_network_and_diffusion_modules_know_nothing_of_params_yaml():
    for name in ("unet", "diffusion", "schedule", "samplers", "optim"):
        deps = graph()[f"diffusion_core.{name}"]
        assert "diffusion_core.config" not in deps, f"diffusion_core/{name}.py imports the config"


def test_configuration_doc_is_generated_from_the_config():
    from diffusion_core.config_doc import markdown

    doc = REPO / "docs" / "configuration.md"
    assert doc.read_text() == markdown(), "docs/configuration.md is stale: python -m diffusion_core.config_doc > docs/configuration.md"


def test_params_yaml_holds_the_configs_defaults_and_every_key_is_documented():
    from diffusion_core.config import Config, declared_fields, load_config

    assert load_config(REPO / "params.yaml") == Config(), "params.yaml and the dataclass defaults differ"
    for key, _, f in declared_fields():
        assert f.metadata.get("help"), f"{key} has no help text"


def test_one_stage_params_map():
    """dvc.yaml's params are the map: the train stage's params are the groups the resume check
    compares, and every tracked or logged-with stage is in dvc.yaml."""
    from diffusion_core import tracking
    from diffusion_core.config import TRAINING_GROUPS

    stages = dvc_stages()
    assert tuple(stages["train"]["params"]) == TRAINING_GROUPS
    assert set(tracking.STAGES) | set(tracking.LOGGED_WITH) <= set(stages)
    assert set(tracking.LOGGED_WITH.values()) <= set(tracking.STAGES)
    assert tracking.dvc_params() == {s: tuple(spec.get("params", ())) for s, spec in stages.items()}
    flat = {"seed": 0, "train.lr": 1.0, "clip.batch_size": 2, "clip.models": ["x"], "sweep.per_class": 3, "sweep.samplers": []}
    assert tracking.stage_params(flat, "evaluate") == {"seed": 0, "clip.batch_size": 2, "clip.models": ["x"]}
    assert set(tracking.stage_params(flat, "report")) == {"seed", "clip.models", "clip.batch_size", "sweep.per_class", "sweep.samplers"}


LIMIT_FUNCTION, LIMIT_MODULE = 80, 500


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_80_lines_and_no_module_over_500(package):
    for path in sorted((REPO / package).glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= LIMIT_MODULE, f"{path.name}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= LIMIT_FUNCTION, f"{path.name}:{node.lineno} {node.name} has {length} lines"


def test_tracking_uri_as_committed_files_show_it(monkeypatch, tmp_path):
    """reports/runs.md is committed: it names the project's mlflow.db, not this machine's path, and
    never a server's password."""
    from diffusion_core import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.display_uri(tmp_path) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@tracking.example:5000")
    assert tracking.display_uri(tmp_path) == "http://tracking.example:5000"
