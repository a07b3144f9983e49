"""`gpurnn.plugin`, the one module a layer plugin imports gpurnn through: every name it lists resolves,
and the built-in plugins (and the example third-party package) import gpurnn through it alone."""

import ast
from pathlib import Path

import pytest

import gpurnn.plugin

ROOT = Path(__file__).parents[1]
PLUGIN_FILES = sorted((ROOT / "plugins").glob("*.py"))


def gpurnn_imports(path):
    """The gpurnn modules a file imports, as written (``gpurnn.plugin``, ``gpurnn.layers``, ...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "gpurnn"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "gpurnn":
            found.append(node.module if node.module != "gpurnn" else f"gpurnn.{node.names[0].name}")
    return found


def test_every_name_in_all_resolves_once():
    names = gpurnn.plugin.__all__
    assert len(names) == len(set(names))
    missing = [name for name in names if not hasattr(gpurnn.plugin, name)]
    assert not missing


def test_what_the_built_in_plugins_need_is_all_there():
    for name in ("hookimpl", "Layer", "RecurrentLayer", "LayerContext", "init_matrix", "ParamLayout", "SpecError",
                 "LayerExport", "RecurrentExport", "matmul", "lstm_gates", "gru_gates", "IGNORE"):
        assert name in gpurnn.plugin.__all__, name


@pytest.mark.parametrize("path", PLUGIN_FILES + [ROOT / "tests" / "plugin_pkg" / "gpurnn_example_layers.py"],
                         ids=lambda p: p.name)
def test_plugins_import_gpurnn_only_through_gpurnn_plugin(path):
    imports = gpurnn_imports(path)
    assert set(imports) <= {"gpurnn.plugin"}, f"{path.name} imports {sorted(set(imports) - {'gpurnn.plugin'})}"
    if path.name != "__init__.py":
        assert imports, f"{path.name} imports nothing of gpurnn: is the check reading the right files?"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "gpurnn.plugin":
            for alias in node.names:
                assert alias.name in gpurnn.plugin.__all__, f"{path.name}: {alias.name} is not in gpurnn.plugin.__all__"


def test_gate_views_name_the_blocks_and_write_through():
    import numpy as np
    a = np.arange(2 * 12, dtype=float).reshape(2, 12)
    i, f, g, o = gpurnn.plugin.lstm_gates(a)
    assert gpurnn.plugin.lstm_gates(a).f is not None and f.shape == (2, 3)
    np.testing.assert_array_equal(o, a[:, 9:])
    g[...] = -1
    assert (a[:, 6:9] == -1).all()
    r, z, n = gpurnn.plugin.gru_gates(a[:, :9])
    np.testing.assert_array_equal(gpurnn.plugin.gru_gates(a[:, :9]).n, a[:, 6:9])
    np.testing.assert_array_equal(r, a[:, :3])
