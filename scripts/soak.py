"""Soak: one training run interrupted again and again, each time run again, ends as the uninterrupted run.

    python scripts/soak.py [--interruptions 100] [--seed N] [--ranks 2] [--tmpfs] [--folder DIR]

From a printed seed it draws a schedule of interruptions (kill -9, SIGTERM, SIGINT, two SIGINTs) at
moments: a random time (startup included), before the first save, inside a checkpoint save, inside
--keep-best's copy, inside an evaluation, inside a metrics write (the line half written), inside the
metrics repair a resume makes; with --tmpfs (root) the run's folder is a small tmpfs that fills once
and is freed. After each interruption it runs the same command again, with --resume where the schedule
says (a refusal naming --resume is followed by the command with it). At the end the final checkpoint
and the best one must equal an uninterrupted run's bit for bit, the metrics file must hold valid JSON
lines with each logged step once, and no temporary or lock file may be left. It prints the counts, the
result and the wall time against the uninterrupted run's; exit status 1 on a failure.

With --ranks 2 the run is `mpiexec -n 2` and an interruption is kill -9 of one rank or SIGINT to mpiexec.

To land inside a moment, each run is this script's `child` mode: the gpurnn command line with hooks
that, at the chosen occurrence of the chosen moment (and only there), write a line to a file and hold
for up to HOLD seconds; the soak interrupts it while it holds. Nothing else about the run changes.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HOLD = 2.0
ITERS_PER_INTERRUPTION = 100
OPTIONS = ["--hidden-size", "8", "--wordvec-size", "8", "--batch-size", "4", "--time-size", "5", "--lr", "0.1",
           "--lr-decay", "0.5", "--clip", "5", "--eval-every", "7", "--save-every", "10", "--log-every", "3",
           "--keep-best", "--quiet"]
SIGNALS = {"kill -9": [signal.SIGKILL], "SIGTERM": [signal.SIGTERM], "SIGINT": [signal.SIGINT],
           "SIGINT twice": [signal.SIGINT, signal.SIGINT]}
MOMENTS = ["any time", "before the first save", "save", "best copy", "evaluation", "metrics write",
           "metrics repair"]
# What an interrupted single process may end with: done, killed (-9, or -15/-2 before its handlers are
# set), or stopped by its handlers (130, 143).
ENDINGS = {0, -9, -15, -2, 130, 143}


DROPPED_CTRL_C = re.compile(r"^Exception ignored in: .*\n(?:Traceback .*\n(?:  .*\n|\n)*)?KeyboardInterrupt: ?\n",
                            re.M)


# -- the child: gpurnn's command line with hooks ----------------------------------------------------

class Moment:
    """Counts the moments; holds at the first of those SOAK_AT names ("save:2,metrics write:5") to come."""

    def __init__(self):
        self.targets = {name: int(count) for name, _, count in
                        (item.rpartition(":") for item in os.environ.get("SOAK_AT", "").split(",") if item)}
        self.seen, self.held = {}, False
        self.say = os.environ.get("SOAK_SAY")

    def due(self, name):
        self.seen[name] = self.seen.get(name, 0) + 1
        return not self.held and self.targets.get(name) == self.seen[name]

    def hold(self, name):
        self.held = True
        with open(self.say, "a") as f:
            f.write(f"held {os.getpid()} {name}\n")
        for _ in range(int(HOLD / 0.01)):  # short sleeps: a signal handler runs between them
            time.sleep(0.01)


def child(argv):
    """Run `gpurnn ARGV` with the hooks SOAK_AT asks for (in rank 0 of a job only)."""
    from gpurnn import atomic, jsontext
    from gpurnn.cli import main
    from gpurnn.train import metrics, parallel, trainer

    rank = parallel.launcher_value(parallel.RANK_VARIABLES) or 0
    if os.environ.get("SOAK_SAY"):
        with open(os.environ["SOAK_SAY"], "a") as f:
            f.write(f"rank{rank} {os.getpid()}\n")
    moment = Moment()
    if rank != 0 or not moment.targets:
        return main(argv)

    fsync_path = atomic.fsync_path

    def fsync_then_hold(path, directory=False):  # between an atomic write's data and its rename
        fsync_path(path, directory)
        written = re.fullmatch(r"\.(.+)\.\d+\.tmp", Path(path).name)
        target = written.group(1) if written and not directory else ""
        kind = ("best copy" if target.endswith(".best.h5") else "save" if target.endswith(".h5")
                else "metrics repair" if target.endswith(".jsonl") else None)
        if kind and moment.due(kind):
            moment.hold(kind)

    atomic.fsync_path = fsync_then_hold

    perplexity = trainer.perplexity

    def perplexity_holding_halfway(*args, progress=None, **kwargs):
        def step(done, total):
            if done == max(1, total // 2) and moment.due("evaluation"):
                moment.hold("evaluation")
            if progress:
                progress(done, total)
        return perplexity(*args, progress=step, **kwargs)

    trainer.perplexity = perplexity_holding_halfway

    write = metrics.MetricsLog._write

    def write_holding_halfway(self, record, mode="a"):
        if not (self.write and record.get("kind") == "step" and moment.due("metrics write")):
            return write(self, record, mode)
        text = jsontext.dumps(record) + "\n"
        with open(self.path, mode) as f:
            f.write(text[:len(text) // 2])
            f.flush()
            moment.hold("metrics write")
            f.write(text[len(text) // 2:])

    metrics.MetricsLog._write = write_holding_halfway
    return main(argv)


# -- the soak -------------------------------------------------------------------------------------

def make_corpus(folder):
    """A small word corpus with train/valid/test splits from the PTB lines gpurnn ships."""
    from importlib.resources import files

    from gpurnn.data import prepare_corpus

    lines = files("gpurnn.data").joinpath("ptb_first_1000_words.txt").read_text().splitlines()
    for name, part in (("train", lines[:30]), ("valid", lines[30:37]), ("test", lines[37:])):
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n")
    prepare_corpus(folder / "train.txt", folder / "corpus.h5", valid=folder / "valid.txt", test=folder / "test.txt")
    return folder / "corpus.h5"


class Soak:
    def __init__(self, folder, corpus, ranks, seed, iters):
        self.folder, self.corpus, self.ranks, self.iters = folder, corpus, ranks, iters
        self.rng = random.Random(seed)
        self.say = folder / "moments.txt"
        self.counts, self.failures, self.wall, self.any_time = {}, [], 0.0, 1.0

    def command(self, checkpoint, resume):
        args = [sys.executable, __file__, "child", "--backend", "numpy", "train", str(self.corpus), *OPTIONS,
                "--max-iters", str(self.iters), "--checkpoint", str(checkpoint), *(["--resume"] if resume else [])]
        if self.ranks > 1:
            args = [os.environ.get("MPIEXEC") or shutil.which("mpiexec") or "mpiexec", "-n", str(self.ranks), *args]
        return args

    def start(self, checkpoint, resume, at=""):
        self.say.write_text("")
        env = {**os.environ, "SOAK_SAY": str(self.say), "SOAK_AT": at, "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        return subprocess.Popen(self.command(checkpoint, resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)

    def said(self):
        return [line.split() for line in self.say.read_text().splitlines() if line.strip()]

    def reference(self, checkpoint):
        """Run the command uninterrupted; its wall time. Sets `any_time`, the span an interruption at
        any time is drawn from: the start-up and about 60 iterations."""
        started = time.monotonic()
        proc = self.start(checkpoint, resume=False)
        while proc.poll() is None and len(self.said()) < self.ranks:
            time.sleep(0.002)
        up = time.monotonic() - started
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"soak: the uninterrupted run failed: {err}")
        wall = time.monotonic() - started
        self.any_time = up + 60 * (wall - up) / self.iters
        return wall

    def attempt(self, checkpoint, resume, at="", signals=(), after=None, victim="rank0"):
        """Run the command once; deliver `signals` where a moment of `at` holds, or else (no `at`) after
        `after` seconds. (exit code, stderr, the moment the signals were delivered at, or None)."""
        started = time.monotonic()
        proc = self.start(checkpoint, resume, at)
        delivered = None
        deadline = started + (after if after is not None else 300)
        while proc.poll() is None and signals and not delivered:
            said = self.said()
            held = [" ".join(words[2:]) for words in said if words[0] == "held"]
            # every rank has started gpurnn (a signal before that meets Python's own start-up)
            started_up = sum(words[0].startswith("rank") for words in said) == self.ranks
            if held or (not at and time.monotonic() >= deadline and started_up):
                delivered = (held or ["any time"])[0] if self.deliver(proc, said, signals, victim) else None
            time.sleep(0.002)
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            self.fail(f"a run still went on 300 s after its interruption: {err}")
        self.wall += time.monotonic() - started
        return proc.returncode, err, delivered

    def deliver(self, proc, said, signals, victim):
        pids = {words[0]: int(words[1]) for words in said if words[0].startswith("rank")}
        for k, signum in enumerate(signals):
            if k:
                time.sleep(self.rng.uniform(0.0, 0.2))
            try:
                if self.ranks > 1 and signum == signal.SIGKILL:
                    if victim not in pids:
                        return False
                    os.kill(pids[victim], signum)
                else:
                    proc.send_signal(signum)
            except ProcessLookupError:
                return False
        return True

    def fail(self, message):
        self.failures.append(message)
        print(f"FAILED: {message}", flush=True)

    def check_ending(self, code, err, what):
        # Python drops a KeyboardInterrupt raised inside a garbage-collector callback, printing it as
        # "Exception ignored": a Ctrl-C lost before gpurnn's handlers are set, counted, not a failure.
        err, dropped = DROPPED_CTRL_C.subn("", err)
        if dropped:
            self.count("Ctrl-C dropped by Python (in a callback), the run went on")
        if "Traceback" in err or "Exception ignored" in err:
            self.fail(f"{what}: a traceback: {err}")
        elif self.ranks == 1 and code not in ENDINGS:
            self.fail(f"{what}: exit status {code}: {err}")

    def interrupt(self, checkpoint, number):
        """One scheduled interruption, and the rerun with --resume where the command without it is refused."""
        name = self.rng.choice(list(SIGNALS)) if self.ranks == 1 else self.rng.choice(["kill -9", "kill -9", "SIGINT"])
        moment = self.rng.choice(MOMENTS)
        saved = checkpoint.exists()
        if moment == "before the first save" and saved or moment == "metrics repair" and not saved:
            moment = "any time"
        at, after = "", self.rng.uniform(0.0, self.any_time)
        if moment == "before the first save":
            at = f"metrics write:{self.rng.randint(1, 3)}"
        elif moment != "any time":  # the first of each may be the one the stopped run lost; later ones make
            # progress. Where it does not come (no repair needed, no new best), a later metrics write.
            at = f"{moment}:{1 if moment == 'metrics repair' else self.rng.randint(1, 4)}"
            if moment != "metrics write":
                at += f",metrics write:{self.rng.randint(15, 25)}"
        resume = self.rng.random() < 0.7
        victim = self.rng.choice(["rank0", "rank1"])
        what = f"#{number} {name} at {at or moment}, {'--resume' if resume else 'plain'}"
        code, err, delivered = self.attempt(checkpoint, resume, at, SIGNALS[name], after, victim)
        if code == 2 and not resume and "pass --resume" in err:
            self.count("refusals naming --resume")
            code, err, delivered = self.attempt(checkpoint, True, at, SIGNALS[name], after, victim)
        self.check_ending(code, err, what)
        if delivered and moment == "before the first save":
            delivered += " before the first save"
        self.count(f"{name} at {delivered}" if delivered else "runs that ended first")
        print(f"{what}: exit {code} ({'at ' + delivered if delivered else 'ended first'})", flush=True)

    def count(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1

    def fill_once(self, checkpoint, disk):
        """The run's file system fills: the run stops with one line (or finishes), then the room is freed."""
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, bytes(65536)):
                pass
        except OSError:  # full
            pass
        finally:
            os.close(fd)
        code, err, _ = self.attempt(checkpoint, checkpoint.exists())
        filler.unlink()
        errors = [line for line in err.splitlines() if line.startswith("gpurnn: error: ")]  # besides notes
        if code not in (0, 2) or (code == 2 and (len(errors) != 1 or "No space left" not in errors[0])):
            self.fail(f"on a full disk: exit {code}: {err}")
        self.count("full disk")
        print(f"full disk: exit {code}{': ' + errors[-1] if errors else ''}", flush=True)

    def finish(self, checkpoint):
        for _ in range(3):
            code, err, _ = self.attempt(checkpoint, checkpoint.exists())
            if code == 0:
                return
        self.fail(f"the last run did not finish: exit {code}: {err}")


def same_checkpoint(a, b):
    """Where checkpoints a and b differ in training state (arrays bit for bit, iteration, stream, lr), or None."""
    import numpy as np

    from gpurnn.train.checkpoint import load_checkpoint

    a, b = load_checkpoint(a), load_checkpoint(b)
    for group in ("params", "optimizer_arrays", "state"):
        x, y = getattr(a, group), getattr(b, group)
        if x.keys() != y.keys():
            return f"{group} names"
        for k in x:
            if x[k].dtype != y[k].dtype or not np.array_equal(x[k], y[k]):
                return f"{group} {k}"
    for key in ("trainer", "stream", "optimizer_scalars", "config"):
        if a.meta.get(key) != b.meta.get(key):
            return key
    return None


def metrics_problems(path, reference):
    """What is wrong with the soaked run's metrics file, compared with the uninterrupted run's."""
    text = path.read_text()
    if not text.endswith("\n"):
        return ["the last line has no end"]
    try:
        records = [json.loads(line) for line in text.splitlines()]
    except ValueError as exc:
        return [f"a line is not JSON: {exc}"]
    steps = [r for r in records if r.get("kind") == "step"]
    iterations = [r["iteration"] for r in steps]
    problems = []
    if len({r["run_id"] for r in records}) != 1:
        problems.append("more than one run id")
    if iterations != sorted(set(iterations)):
        problems.append("a step logged twice or out of order")
    expected = {r["iteration"]: r for r in map(json.loads, reference.read_text().splitlines())
                if r.get("kind") == "step"}
    missing = sorted(set(expected) - set(iterations))
    if missing:
        problems.append(f"steps missing: {missing}")
    for r in steps:  # an interruption adds a step record; the evaluations and lr must match the reference's
        e = expected.get(r["iteration"])
        if e and (e["lr"] != r["lr"] or e.get("valid_perplexity", r.get("valid_perplexity")) != r.get("valid_perplexity")):
            problems.append(f"iteration {r['iteration']}: lr or valid_perplexity differs")
    return problems


def soak(interruptions, seed, ranks=1, tmpfs=False, folder=None):
    """Run the soak; True when it passed."""
    folder = Path(folder or f"soak-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(folder)
    runner = Soak(folder, corpus, ranks, seed, iters=ITERS_PER_INTERRUPTION * max(interruptions, 1))
    print(f"soak: seed {seed}, {interruptions} interruptions, {ranks} rank(s), folder {folder}", flush=True)
    (folder / "reference").mkdir(exist_ok=True)
    reference = folder / "reference" / "ck.h5"
    for stale in folder.glob("reference/*"):
        stale.unlink()
    uninterrupted = runner.reference(reference)
    run = folder / "run"
    if run.is_mount():
        subprocess.run(["umount", str(run)], check=True)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    disk = run if tmpfs and mount_tmpfs(run) else None
    checkpoint = run / "ck.h5"
    full_at = runner.rng.randrange(max(interruptions, 1)) if disk else None
    try:
        for number in range(interruptions):
            if number == full_at:
                runner.fill_once(checkpoint, disk)
            runner.interrupt(checkpoint, number + 1)
        runner.finish(checkpoint)
        for ours, theirs in ((checkpoint, reference), (run / "ck.best.h5", folder / "reference" / "ck.best.h5")):
            differs = same_checkpoint(ours, theirs)
            if differs:
                runner.fail(f"{ours.name} differs from the uninterrupted run's in {differs}")
        for problem in metrics_problems(run / "ck.metrics.jsonl", folder / "reference" / "ck.metrics.jsonl"):
            runner.fail(f"metrics: {problem}")
        left = sorted(n for n in os.listdir(run) if n.endswith((".tmp", ".lock")))
        if left:
            runner.fail(f"files left: {left}")
    finally:
        if disk:
            subprocess.run(["umount", "--lazy", str(run)], check=False)
    for key, count in sorted(runner.counts.items()):
        print(f"  {count:4d}  {key}")
    print(f"soak: seed {seed}: {'PASSED' if not runner.failures else f'{len(runner.failures)} FAILURE(S)'}; "
          f"wall time {runner.wall:.1f} s = {runner.wall / uninterrupted:.1f} x the uninterrupted run's "
          f"{uninterrupted:.1f} s", flush=True)
    return not runner.failures


def mount_tmpfs(folder):
    """Mount a 64 MiB tmpfs on `folder` (root only); False, said, where it cannot be."""
    if os.geteuid() != 0:
        print("soak: --tmpfs needs root; left out", flush=True)
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        print(f"soak: cannot mount a tmpfs ({done.stderr.strip()}); left out", flush=True)
    return done.returncode == 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interruptions", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None, help="default: drawn, and printed")
    parser.add_argument("--ranks", type=int, default=1, help="2: under mpiexec, killing one rank")
    parser.add_argument("--tmpfs", action="store_true", help="(root) the run on a small tmpfs that fills once")
    parser.add_argument("--folder", help="where the soak works (default: soak-SEED)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(10 ** 6)
    return 0 if soak(args.interruptions, seed, args.ranks, args.tmpfs, args.folder) else 1


if __name__ == "__main__":
    sys.exit(main())
