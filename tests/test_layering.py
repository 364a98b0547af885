"""The library never imports the application (``pointsparse.app``): every
library module imports without it, and no library source names it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from reference import ROOT

PACKAGE = ROOT / "pointsparse"


def library_modules() -> list[str]:
    """Every module of the package outside ``pointsparse.app`` (and the ``python -m`` entry)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1:2] == ("app",) or parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_library_modules_are_found():
    names = library_modules()
    for expected in ("pointsparse.tensor", "pointsparse.coords", "pointsparse.voxelize", "pointsparse.kmap",
                     "pointsparse.nn", "pointsparse.models", "pointsparse.data", "pointsparse.prune",
                     "pointsparse.formats", "pointsparse.ops", "pointsparse.export", "pointsparse.checkpoint",
                     "pointsparse.prune.workflow", "pointsparse.data.transforms"):
        assert expected in names
    assert not any(n.startswith("pointsparse.app") for n in names)


def test_importing_the_library_does_not_import_the_app():
    script = ("import importlib, sys\n"
              f"for name in {library_modules()!r}:\n"
              "    importlib.import_module(name)\n"
              "    if 'pointsparse.app' in sys.modules:\n"
              "        print(name); sys.exit(1)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing {proc.stdout.strip()} imported pointsparse.app\n{proc.stderr[-2000:]}"


def _imports(path, root=ROOT) -> list[tuple[int, str]]:
    """(line, absolute name) of every import in ``path`` (a file under
    ``root``), function-level and relative ones included."""
    parts = path.relative_to(root).with_suffix("").parts
    package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _app_imports(path, root=ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{line}: {name}" for line, name in _imports(path, root)
            if name == "pointsparse.app" or name.startswith("pointsparse.app.")]


def test_no_library_source_imports_the_app():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if not (name.startswith("pointsparse.app") or name == "pointsparse.__main__"):
            offending += _app_imports(path)
    assert not offending, "\n".join(offending)


def test_the_source_scan_finds_every_form_of_app_import(tmp_path):
    probe = tmp_path / "pointsparse" / "prune" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import torch\nfrom . import graph\n\ndef f():\n    from ..app import cli\n"
                     "    from .. import app\n    import pointsparse.app.train\n")
    found = [line.split(": ", 1)[1] for line in _app_imports(probe, tmp_path)]
    assert found == ["pointsparse.app.cli", "pointsparse.app", "pointsparse.app.train"]
