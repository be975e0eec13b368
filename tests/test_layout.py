"""The package's layout: every import inside it points down, so it has no circle and no upward arrow.

A module may import only modules of a lower layer, including imports made inside functions (the
lazy ones that keep Ray or torch out of a command that does not need them). A new module must be
given a layer here, which is the point: where it sits is decided, not drifted into.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_pipeline"

LAYERS = [
    ["cli"],
    ["pipeline"],  # stages and commands only
    ["embed", "select", "distributed", "proxy", "tune", "report", "export"],  # one stage each
    ["finetune", "heldout"],  # the per-worker training loop that tune runs; the held-out parts
    ["cluster", "models", "data", "artifacts", "device", "runtime", "verdict"],
    ["kcenter", "boundary", "config", "formats", "chat"],  # kcenter, boundary: the pure selection kernels
    ["config_finetune"],  # the finetune part of the config (config re-exports it)
    ["typed", "metrics"],
    ["errors", "faults", "__init__"],
]
LAYER = {m: len(LAYERS) - i for i, names in enumerate(LAYERS) for m in names}  # higher number: higher layer


def package_imports(path: Path) -> set[str]:
    """The ray_pipeline modules that ``path`` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x (a module, or a name of __init__)
                found |= ({node.module.split(".")[0]} if node.module else
                          {a.name if (path.parent / f"{a.name}.py").is_file() else "__init__" for a in node.names})
            elif node.module and node.module.startswith("ray_pipeline"):
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ray_pipeline.")}
    found.discard(path.stem)
    return {"__init__" if m == "ray_pipeline" else m for m in found}


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(LAYER), f"give these a layer: {sorted(modules - set(LAYER))}; gone: {sorted(set(LAYER) - modules)}"


def test_every_import_points_down():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        for target in sorted(package_imports(path)):
            if LAYER[target] >= LAYER[path.stem]:
                upward.append(f"{path.stem} -> {target}")
    assert not upward, f"imports that do not point down: {upward}"


def test_the_checker_sees_lazy_and_absolute_imports(tmp_path):
    # the test above can fail: a function-level relative import and an absolute one are both found
    f = tmp_path / "select.py"
    f.write_text("def f():\n    from .pipeline import run_all\n    import ray_pipeline.cli\n"
                 "from . import faults, __version__\n")
    (tmp_path / "faults.py").write_text("")
    assert package_imports(f) == {"pipeline", "cli", "faults", "__init__"}


def test_no_module_is_much_over_400_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 440}
    assert not long, f"split these modules: {long}"
