"""Run inside gpurnn's suite, the example plugin's own tests import it from this folder (as its
pyproject's pytest `pythonpath` does when they are run from here)."""

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def example_plugin_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
