"""Packaging: one import namespace (``adapter_composer``), nothing shadowed by a user's files,
a wheel that holds only that namespace and runs the demo, no import cycles."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import networkx as nx
import pytest

import adapter_composer as ac

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# the repository's folders and the package names they install as
FOLDERS = {folder: pkg for pkg, folder in SETUPTOOLS["package-dir"].items()}


def _package_of(directory: Path) -> str:
    """The import name of a source directory under one of the mapped folders."""
    rel = directory.relative_to(ROOT)
    top = rel.parts[0]
    return ".".join([FOLDERS[top], *rel.parts[1:]])


def _source_packages() -> set[str]:
    return {_package_of(init.parent) for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, **kw)


def test_the_three_folders_install_as_one_namespace():
    assert FOLDERS == {"composer": "adapter_composer", "plugins": "adapter_composer.plugins", "registry": "adapter_composer.registry"}


def test_every_source_package_is_in_the_wheel_list():
    listed = set(SETUPTOOLS["packages"])
    assert _source_packages() == listed, "add new subpackages to [tool.setuptools] packages in pyproject.toml"


def test_version_and_metadata():
    assert ac.__version__ == md.version("adapter-composer")
    meta = md.metadata("adapter-composer")
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("Project-URL") and meta.get_all("Classifier")
    assert (Path(ac.__file__).parent / "py.typed").is_file()
    proc = _run([sys.executable, "-m", "adapter_composer.cli", "--version"], ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"adapter-composer {ac.__version__}"


def test_tests_and_examples_import_only_the_installed_package():
    pattern = re.compile(r"^\s*(?:import|from)\s+(composer|plugins|registry)\b", re.M)
    offenders = [
        f"{p.relative_to(ROOT)}: {m.group(0).strip()}"
        for d in ("tests", "examples")
        for p in (ROOT / d).rglob("*.py")
        for m in pattern.finditer(p.read_text())
    ]
    assert not offenders, offenders


def test_a_users_own_plugins_registry_and_composer_shadow_nothing(tmp_path):
    # the names a user's working directory is likely to hold, each broken on purpose
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "__init__.py").write_text("raise ImportError('user plugins/ was imported')\n")
    (tmp_path / "plugins" / "lora.py").write_text("raise ImportError('user plugins/lora.py was imported')\n")
    (tmp_path / "registry.py").write_text("raise ImportError('user registry.py was imported')\n")
    (tmp_path / "composer").mkdir()
    (tmp_path / "composer" / "__init__.py").write_text("raise ImportError('user composer/ was imported')\n")
    script = """
import sys, torch
import adapter_composer as ac
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
g = ac.Graph()
g.adapter("a", "lora", r=2, targets=["attn.q"])
c = ac.compose(model, g)
record = c.registry.method("lora")
lora = sys.modules[record.plugin]
assert record.plugin == "adapter_composer.plugins.lora", record.plugin
assert not any(n in sys.modules for n in ("plugins", "registry", "composer")), sorted(sys.modules)
print("ok", lora.__file__)
"""
    proc = _run([sys.executable, "-c", script], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ") and str(tmp_path) not in proc.stdout


def _module_name(path: Path) -> str:
    pkg = _package_of(path.parent)
    return pkg if path.name == "__init__.py" else f"{pkg}.{path.stem}"


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Modules imported anywhere in ``tree`` (function bodies too), except under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_import_cycles():
    modules: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            modules[_module_name(path)] = path
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            # a subpackage importing its parent package's names is not a cycle of modules
            if target in modules and target != name and not name.startswith(target + "."):
                graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" → ".join([*c, c[0]]) for c in cycles[:5])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("adapter_composer-*.whl")
    return path


def test_the_wheel_holds_only_adapter_composer(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"adapter_composer", f"adapter_composer-{ac.__version__}.dist-info"}, tops
    for needed in ("py.typed", "demo.py", "plugins/lora.py", "registry/hookspecs.py", "pipeline/plan.py"):
        assert f"adapter_composer/{needed}" in names, needed


def test_the_demo_runs_from_a_wheel_install(wheel, tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path).returncode == 0
    python, cli = venv / "bin" / "python", venv / "bin" / "adapter-composer"
    proc = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = _run([str(python), "-c", "import adapter_composer as ac; print(ac.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr  # the wheel, not the checkout
    assert _run([str(cli), "--version"], tmp_path).stdout.strip() == f"adapter-composer {ac.__version__}"
    proc = _run([str(cli), "demo", "--steps", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reload bit-identical: True" in proc.stdout
