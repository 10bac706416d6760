"""The package's layering, read from its source: no import circles, no stage importing another stage, and MLflow
only inside ``pipeline.tracking`` (every import counted, those inside functions too)."""

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
STAGES = {f"pipeline.{name}" for name in ("bench", "download", "generate", "prepare", "profile", "report", "server")}
STAGES |= {"pipeline.train", "pipeline.ui", "pipeline.results"}  # each a `python -m` entry point with a main()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every module ``name`` imports, absolute; ``from pipeline import x`` counts as ``pipeline.x`` when x is one."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).rstrip(".")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def internal_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's own ``__init__`` importing its parts aside)."""
    graph = {}
    for name in MODULES:
        deps = {d for d in imports(name) if d in MODULES and d != name}
        graph[name] = {d for d in deps if not d.startswith(f"{name}.")}  # a package re-exporting its parts
    return graph


def test_there_are_no_import_circles():
    graph = internal_graph()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"import circle: {' -> '.join(err.args[1])}") from None
    assert "pipeline.tracking.runs" in graph["pipeline.tracking.sweeps"]  # the graph sees the package's parts


def test_no_stage_imports_another_stage():
    graph = internal_graph()
    found = {(stage, dep) for stage in STAGES for dep in graph[stage] if dep in STAGES}
    assert not found, f"a stage imports another (move what they share to a library module): {sorted(found)}"
    assert {name for name in STAGES if name in MODULES} == STAGES  # the list names real modules


def test_only_the_tracking_package_imports_mlflow():
    users = {name for name in MODULES if any(d == "mlflow" or d.startswith("mlflow.") for d in imports(name))}
    assert users and all(name.startswith("pipeline.tracking") for name in users), sorted(users)


def test_library_modules_import_no_stage():
    """Stages sit on top: a library module (models, tasks, sweep, ...) that imported one would pull in its Hydra
    app and its whole set of dependencies."""
    graph = internal_graph()
    found = {(lib, dep) for lib in set(MODULES) - STAGES for dep in graph[lib] if dep in STAGES}
    assert not found, sorted(found)
