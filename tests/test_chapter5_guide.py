"""docs/chapter5.md runs: its ```python blocks are executed in order in one namespace, each asserting
what it shows, so the guide cannot drift from the code."""

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).parents[1] / "docs" / "chapter5.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_guide_has_a_block_for_each_idea():
    assert len(BLOCKS) == 8
    for needle in ("sentence_log_probability", "np.tanh(h @ Wh + x[:, t] @ Wx + b)", "(up - down) / (2 * eps)",
                   "second = model.predict", "BPTTStream(positions, batch_size=2, time_size=10)", "perplexity(",
                   '"you say goodbye", "you say good die"'):
        assert any(needle in block for block in BLOCKS), needle


@pytest.fixture(scope="module")
def namespace():
    return {"__name__": "chapter5"}


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_each_block_runs_and_its_assertions_hold(namespace, number):
    """Blocks run in the guide's order (pytest keeps parametrized order), sharing one namespace."""
    assert namespace.get("_next_block", 0) == number, "an earlier block did not run"
    exec(compile(BLOCKS[number], f"{GUIDE.name}, block {number + 1}", "exec"), namespace)
    namespace["_next_block"] = number + 1
