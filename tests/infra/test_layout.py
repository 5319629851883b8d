"""The repository layout and the dependency direction: model <- jobs <- serve, platform/ not a package.

serve/ may import the jobs/ library modules that hold code both sides need (one home for resolving a
model source to a checkpoint, one for starting Ray); jobs/ never imports serve/, and model/ imports
neither (nor ray, mlflow or fastapi).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "jobs", "serve")
# What model/ may import besides the standard library and itself (architecture.md).
MODEL_THIRD_PARTY = {"torch", "numpy", "PIL", "safetensors", "timm"}  # timm: optional backbones (model/backbones.py)
# The one homes serve/ shares with jobs/ (checkpoint resolution, Ray start-up), and the job drivers serve/ must
# never pull in (Ray Train / Tune / the demo: a replica would import the training stack).
SHARED_WITH_SERVE = {"jobs.checkpoints", "jobs.runtime"}
JOB_DRIVERS = {"jobs.train", "jobs.train_loop", "jobs.sweep", "jobs.study", "jobs.demo", "jobs.evaluate"}


def test_top_level_layout():
    for name in ("pyproject.toml", "Makefile", "constraints.txt", ".ci/run", "cluster.yaml", "README.md"):
        assert (ROOT / name).is_file(), name
    for name in ("platform", "model", "jobs", "serve", "benchmarks", *(f"tests/{p}" for p in (*PACKAGES, "infra"))):
        assert (ROOT / name).is_dir(), name


def test_platform_is_not_a_python_package():
    python_files = [p.relative_to(ROOT) for p in (ROOT / "platform").rglob("*.py")]
    assert not python_files, f"platform/ must hold no Python: {python_files}"
    assert not list((ROOT / "platform").rglob("__init__.py"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(pattern.startswith("platform") for pattern in include)


def test_stdlib_platform_wins_from_the_repo_root():
    """What `python -m pytest` and a `--working-dir .` Ray worker do: repo root first on sys.path, then import ray."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import platform; print(platform.system()); print(platform.__file__);"
        "import ray; print(ray.__version__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    system, module_file, _ = proc.stdout.split()
    assert system == "Linux"
    assert not Path(module_file).resolve().is_relative_to(ROOT), f"platform imported from {module_file}"


def test_ruff_a005_is_on_and_catches_a_platform_package(tmp_path):
    """Ruff, with this repo's own config, rejects a `platform/__init__.py` (stdlib-module shadowing)."""
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    selected = lint.get("select", []) + lint.get("extend-select", [])
    assert any("A005".startswith(code) for code in selected), selected
    assert not any("A005".startswith(code) for code in lint.get("ignore", [])), lint["ignore"]

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "platform").mkdir()
    (tmp_path / "platform" / "__init__.py").write_text("")
    (tmp_path / "ok.py").write_text("")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "A005" in proc.stdout, proc.stdout + proc.stderr


def imported_top_levels(path: Path, package: str) -> set[str]:
    """Top-level module names imported by one file; relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    depth = len(path.relative_to(ROOT / package).parts)  # 1 for package/x.py, 2 for package/sub/x.py
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module.split(".")[0])
            elif node.level >= depth + 1:  # `from .. import x` above the package: a sibling top-level module
                names.add((node.module or node.names[0].name).split(".")[0])
            else:
                names.add(package)
    return names


def package_imports(package: str) -> dict[str, set[str]]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    return {str(p.relative_to(ROOT)): imported_top_levels(p, package) for p in files}


def jobs_modules_imported(path: Path) -> set[str]:
    """Dotted jobs.* modules one file imports (`import jobs.x`, `from jobs.x import y`, `from jobs import x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "jobs"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "jobs":
            if node.module == "jobs":
                names |= {f"jobs.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return names


def test_jobs_never_imports_serve():
    offenders = {f: sorted(names) for f, names in package_imports("jobs").items() if "serve" in names}
    assert not offenders, f"jobs/ must not import serve/: {offenders}"


def test_serve_imports_jobs_library_modules_never_job_drivers():
    """serve -> jobs is one way: library modules such as checkpoint resolution and Ray start-up, no driver."""
    files = sorted((ROOT / "serve").rglob("*.py"))
    used = {str(p.relative_to(ROOT)): jobs_modules_imported(p) for p in files}
    offenders = {f: sorted(names & JOB_DRIVERS) for f, names in used.items() if names & JOB_DRIVERS}
    assert not offenders, f"serve/ imports job drivers: {offenders}"
    assert set().union(*used.values()) >= SHARED_WITH_SERVE  # serve uses the one homes, not copies


@pytest.mark.parametrize("module", sorted(SHARED_WITH_SERVE))
def test_the_shared_jobs_modules_import_no_other_job_code(module):
    """What serve may import stays a leaf: no other jobs/ module (no job entry points, no cycle back)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    assert jobs_modules_imported(path) - {module, "jobs.console"} == set()


def test_model_imports_no_ray_mlflow_or_fastapi():
    offenders = {
        f: sorted(names & {"ray", "mlflow", "fastapi", "jobs", "serve"})
        for f, names in package_imports("model").items()
        if names & {"ray", "mlflow", "fastapi", "jobs", "serve"}
    }
    assert not offenders, f"model/ must stay pure PyTorch: {offenders}"


def test_model_imports_only_torch_numpy_pillow_safetensors_and_stdlib():
    allowed = set(sys.stdlib_module_names) | MODEL_THIRD_PARTY | {"model", "__future__"}
    offenders = {f: sorted(names - allowed) for f, names in package_imports("model").items() if names - allowed}
    assert not offenders, f"model/ imports outside its contract: {offenders}"


def test_import_scanner_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    """The scanner above must not miss the forms a forbidden import can take."""
    pkg = tmp_path / "jobs"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("from serve.app import build_app\n")
    (pkg / "b.py").write_text("def f():\n    import serve.ingress\n")
    (pkg / "sub" / "c.py").write_text("from ... import serve\nfrom . import sibling\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = package_imports("jobs")
    assert "serve" in found["jobs/a.py"] and "serve" in found["jobs/b.py"]
    assert found["jobs/sub/c.py"] == {"serve", "jobs"}
    (tmp_path / "s.py").write_text(
        "import jobs.train\nfrom jobs import evaluate, runtime\nfrom jobs.checkpoints import x\n"
    )
    assert jobs_modules_imported(tmp_path / "s.py") == {
        "jobs.train",
        "jobs.evaluate",
        "jobs.runtime",
        "jobs.checkpoints",
    }


def test_the_data_pipeline_modules_import_no_torch():
    """jobs.dataset (with jobs.batches, jobs.eval_set, model.tokenizer, model.transform) loads without torch.

    Ray processes that only unpickle the pipeline import these modules: Ray Data's split coordinator, Ray Train's
    dataset manager, the epoch clock actor. With torch at module level each paid ~1.6 s of CPU in every fit
    (checked by /proc/PID/maps during a fit: libtorch in all three before, in none after).
    """
    code = "import sys; sys.path.insert(0, sys.argv[1]); import jobs.dataset; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "a module jobs.dataset imports now imports torch at module level"
