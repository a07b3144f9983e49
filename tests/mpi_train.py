"""Train a tiny LSTM model with dropout in float64 through `prepare_job` (the CLI trains in float32).

Used by test_parallel.py, alone or under mpiexec:

    [mpiexec -n R] python tests/mpi_train.py CORPUS CHECKPOINT MAX_ITERS [--resume]

Each rank prints `rank R sha256 DIGEST` of its parameters, so a test can check the ranks agree.
"""

import hashlib
import sys

from gpurnn.backend import get_backend
from gpurnn.model import preset_specs
from gpurnn.registry import Registry
from gpurnn.train.job import prepare_job

OPTIONS = {"batch_size": 4, "time_size": 5, "optimizer": "sgd", "lr": 1.0, "clip": 0.25, "log_every": 10}


def main(corpus, checkpoint, max_iters, resume=False):
    options = {**OPTIONS, "max_iters": int(max_iters)}
    explicit = {"max_iters"} if resume else set(options)
    trainer, _ = prepare_job(corpus, specs=preset_specs("rnnlm", wordvec_size=16, hidden_size=16, dropout=0.3),
                             options=options, explicit=explicit, backend=get_backend("numpy", dtype="float64"),
                             registry=Registry(), checkpoint=checkpoint, resume=resume)
    trainer.run()
    digest = hashlib.sha256()
    for value in trainer.model.params.values():
        digest.update(value.tobytes())
    print(f"rank {trainer.group.rank} sha256 {digest.hexdigest()}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4], resume="--resume" in sys.argv[4:])
