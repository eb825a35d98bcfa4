"""torchrun entry for tests/test_train.py::test_elastic_restart_resumes: the first attempt of
every worker dies at a given step (after a checkpoint); torchrun --max-restarts restarts it and
train.py resumes from the run folder's latest checkpoint on its own."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

FAIL_AT = int(os.environ["ELASTIC_TEST_FAIL_AT"])
real_step, calls = train.train_step, [0]


def failing_step(*args, **kwargs):
    calls[0] += 1
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0 and calls[0] == FAIL_AT:
        raise RuntimeError("simulated node failure")
    return real_step(*args, **kwargs)


train.train_step = failing_step
train.main(sys.argv[1:])
