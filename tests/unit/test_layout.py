"""The package's layout: folders name the stages, and every import points down.

A module may import only from a lower layer, or from its own subpackage (imports made inside
functions count too: the lazy ones that keep Ray or torch out of a command that does not need
them). Inside a subpackage the modules import each other without a circle. A new subpackage or
top-level module must be given a layer here, which is the point: where it sits is decided, not
drifted into.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ray_pipeline"

LAYERS = [
    ["cli"],  # the ray-pipeline command
    ["pipeline"],  # stages, markers and run.json only
    ["report"],  # the run's HTML report
    ["finetune"],  # stages 8-10: task, held-out split, proxy, training, sweep, verdict, inference
    ["embed", "select"],  # stage 2 (vectors) and stages 3-7 (k-means, kernels, engines)
    ["io", "runtime"],  # files in and out (pool, formats, run directory, export); devices and Ray
    ["config"],  # the one typed config
    ["errors", "faults", "__init__"],
]
LAYER = {m: len(LAYERS) - i for i, names in enumerate(LAYERS) for m in names}  # higher number: higher layer


def unit_of(path: Path) -> str:
    """The layer unit of a file: its subpackage, or its module name at the top level."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__") or "__init__"


def package_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The ray_pipeline modules that ``path`` imports, wherever in the file, as dotted names
    inside the package (``select.kernels``, ``config``, ``faults``; ``__init__`` for the package)."""
    here = path.relative_to(package).parent.parts  # the file's subpackage, () at the top
    found = set()

    def add(dotted: str) -> None:
        found.add(dotted or "__init__")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                mod = base + (node.module.split(".") if node.module else [])
                if node.module:
                    add(".".join(mod))
                else:  # from . import x: a module or subpackage, or a name of the package's __init__
                    for a in node.names:
                        target = package.joinpath(*mod, a.name)
                        add(".".join(mod + [a.name]) if target.with_suffix(".py").is_file() or target.is_dir()
                            else ".".join(mod))
            elif node.module and node.module.split(".")[0] == "ray_pipeline":
                add(".".join(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ray_pipeline":
                    add(".".join(a.name.split(".")[1:]))
    found.discard(module_name(path, package))
    return found


def _files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_subpackage_and_module_has_a_layer():
    units = {unit_of(p) for p in _files()}
    assert units == set(LAYER), f"give these a layer: {sorted(units - set(LAYER))}; gone: {sorted(set(LAYER) - units)}"


def test_every_subpackage_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "Owns" in doc, f"{init.parent.name}/__init__.py needs a docstring saying what it owns"


def test_every_import_points_down():
    upward = []
    for path in _files():
        for target in sorted(package_imports(path)):
            unit = target.split(".")[0]
            if unit != unit_of(path) and LAYER[unit] >= LAYER[unit_of(path)]:
                upward.append(f"{module_name(path)} -> {target}")
    assert not upward, f"imports that do not point down: {upward}"


def test_no_circle_inside_a_subpackage():
    graph = {module_name(p): {t for t in package_imports(p) if t.split(".")[0] == unit_of(p) and "." in t}
             for p in _files() if len(p.relative_to(PACKAGE).parts) > 1}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, f"import circle: {' -> '.join(trail + [m])}"
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            visit(t, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_the_checker_sees_lazy_relative_and_absolute_imports(tmp_path):
    # the tests above can fail: function-level, relative (one and two dots) and absolute imports are found
    (tmp_path / "select").mkdir()
    (tmp_path / "faults.py").write_text("")
    (tmp_path / "select" / "kernels.py").write_text("")
    f = tmp_path / "select" / "engine.py"
    f.write_text("def f():\n    from ..pipeline import run_all\n    import ray_pipeline.cli\n"
                 "from .. import faults, __version__\nfrom .kernels import x\nfrom . import kernels\n")
    assert package_imports(f, tmp_path) == {"pipeline", "cli", "faults", "__init__", "select.kernels"}


def test_no_module_is_much_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _files() if (n := len(p.read_text().splitlines())) > 440}
    assert not long, f"split these modules: {long}"


def test_the_gpu_checks_modules_import_neither_ray_nor_deepspeed():
    # benchmarks/gpu_check.py runs these on a GPU machine that has neither (scripts/gpu_check.sh):
    # they may import Ray or DeepSpeed inside functions, never at module level.
    import subprocess
    import sys

    modules = ["ray_pipeline.select.kernels", "ray_pipeline.select.kmeans", "ray_pipeline.embed.encoders",
               "ray_pipeline.finetune.task", "ray_pipeline.config"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(n for n in ('ray', 'deepspeed') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]", f"importing {modules} imported {out.strip()}"
