"""One experiment layer: the protocol's modules never import ``offsite.experiment`` (only the
experiment package itself and the command-line entries do), and nothing in src/ imports ``bench``."""

from __future__ import annotations

import ast

from test_imports import SRC, import_graph

EXPERIMENT = "offsite.experiment"


def _is_cli(module: str) -> bool:
    """``offsite.cli`` and a package's command-line entry (``offsite.privacy.cli``, ...)."""
    return module == "offsite.cli" or module.endswith(".cli")


def experiment_importers(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    inside = lambda m: m == EXPERIMENT or m.startswith(EXPERIMENT + ".")  # noqa: E731
    return {m: sorted(d for d in deps if inside(d)) for m, deps in graph.items()
            if not inside(m) and not _is_cli(m) and any(inside(d) for d in deps)}


def test_the_test_sees_a_protocol_module_importing_the_experiment(tmp_path):
    pkg = tmp_path / "offsite"
    (pkg / "experiment").mkdir(parents=True)
    for f in ("__init__.py", "experiment/__init__.py", "experiment/run.py", "cli.py"):
        (pkg / f).write_text("")
    (pkg / "harm.py").write_text("def f():\n    from .experiment.run import x\n")
    (pkg / "cli.py").write_text("from offsite.experiment import run\n")
    (pkg / "experiment" / "run.py").write_text("from ..harm import f\n")
    graph = import_graph(tmp_path, "offsite")
    assert experiment_importers(graph) == {"offsite.harm": ["offsite.experiment.run"]}


def test_protocol_modules_do_not_import_the_experiment_layer():
    graph = import_graph()
    assert "offsite.experiment.run" in graph and "offsite.harm" in graph
    bad = experiment_importers(graph)
    assert not bad, "protocol modules importing offsite.experiment:\n" + "\n".join(
        f"{m} -> {', '.join(d)}" for m, d in sorted(bad.items()))


def test_src_never_imports_bench():
    bad = []
    for path in sorted((SRC / "offsite").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.relative_to(SRC)}: {n}" for n in names if n == "bench" or n.startswith("bench.")]
    assert not bad, "src/ importing bench/:\n" + "\n".join(bad)
