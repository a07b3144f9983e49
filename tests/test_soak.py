"""scripts/soak.py in short: one run interrupted at random moments (kill -9, SIGTERM, SIGINT, two SIGINTs;
inside saves, evaluations, metrics writes, the best checkpoint's copy), run again each time, ends as the
uninterrupted run: the same checkpoint and best checkpoint bit for bit, each logged step once, nothing left.
The long soak (100 interruptions and more) is the script itself."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_parallel import MPIEXEC, needs_mpi

pytestmark = pytest.mark.soak
SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def soak(folder, *args):
    """The soak's report; it must pass, with most interruptions landing where they were aimed."""
    env = {**os.environ, "MPIEXEC": str(MPIEXEC)} if MPIEXEC else None
    done = subprocess.run([sys.executable, str(SOAK), "--folder", str(folder), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and re.search(r"seed \d+: PASSED", done.stdout), done.stdout + done.stderr
    landed = re.findall(r"^#\d+ .*\(at (.+)\)$", done.stdout, re.M)
    return landed


def test_a_short_soak_ends_as_the_uninterrupted_run(tmp_path):
    landed = soak(tmp_path, "--interruptions", 8, "--seed", 11)
    assert len(landed) >= 6 and set(landed) - {"any time"}, landed


@needs_mpi
def test_a_short_soak_of_two_ranks_that_loses_one_ends_as_the_uninterrupted_run(tmp_path):
    assert len(soak(tmp_path, "--interruptions", 3, "--seed", 12, "--ranks", 2)) >= 2
