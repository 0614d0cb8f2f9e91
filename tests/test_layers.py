"""The package's layers point one way: a module imports only from its own layer or lower ones,
so that a change to a higher layer (training, say) cannot break a lower one (the data)."""

import ast
from pathlib import Path

import naics_mlflow

PACKAGE = Path(naics_mlflow.__file__).parent
# Lowest first. Within a layer, modules may import each other.
LAYERS = (
    (
        "naics_mlflow",
        "naics_mlflow.errors",
        "naics_mlflow.stopping",
        "naics_mlflow.files",
        "naics_mlflow.config",
        "naics_mlflow.distributed",
    ),
    ("naics_mlflow.data",),
    ("naics_mlflow.model",),
    ("naics_mlflow.evaluation",),
    ("naics_mlflow.references", "naics_mlflow.tracking"),
    ("naics_mlflow.serving", "naics_mlflow.served_model"),
    ("naics_mlflow.training",),
    ("naics_mlflow.cli", "naics_mlflow.__main__"),
)


def _layer(module: str) -> int:
    """The layer of ``module``: that of the longest listed name it is or lies under."""
    matches = [
        (len(name), index)
        for index, names in enumerate(LAYERS)
        for name in names
        if module == name or module.startswith(f"{name}.")
    ]
    return max(matches)[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path) -> set[str]:
    """Every ``naics_mlflow`` module ``path`` imports, at the top or inside a function."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in imported if name.split(".")[0] == "naics_mlflow"}


def _upward_imports() -> list[str]:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for imported in sorted(_project_imports(path)):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    return upward


def test_no_module_imports_a_higher_layer():
    assert _upward_imports() == []


def test_the_check_reads_imports_inside_functions_and_from_imports(tmp_path):
    source = tmp_path / "lower.py"
    source.write_text(
        "from naics_mlflow import tracking\n"
        "def late():\n"
        "    from naics_mlflow.training.stage import train_stage\n"
        "import numpy\n"
    )
    imported = _project_imports(source)
    assert imported == {
        "naics_mlflow",
        "naics_mlflow.tracking",
        "naics_mlflow.training.stage",
        "naics_mlflow.training.stage.train_stage",
    }
    assert [_layer(name) > _layer("naics_mlflow.data.datamodule") for name in sorted(imported)] == [
        False,
        True,
        True,
        True,
    ]
