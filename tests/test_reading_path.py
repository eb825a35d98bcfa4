"""The reading path: every project function one contrastive step runs, from its batches to the
update, is in train.py, model.py or losses.py (README, "Files"); the machinery of a run
(runtime.py, data.py, checkpoints.py, ...) stays outside the step."""
import os
import sys

import pytest

import train
from test_train import tiny, tower3_file  # noqa: F401 - the fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_FILES = {"train.py", "model.py", "losses.py"}


def functions_of_one_step(monkeypatch, argv: list[str]) -> set[tuple[str, str]]:
    """(file, qualified name) of every project function called inside the run's third
    train_step, found with sys.setprofile (the first steps warm up; the last saves)."""
    calls, seen = set(), []
    real = train.train_step

    def profile(frame, event, arg):
        path = os.path.abspath(frame.f_code.co_filename)
        if event == "call" and os.path.dirname(path) == ROOT and os.path.isfile(path):
            calls.add((os.path.basename(path), frame.f_code.co_qualname))

    def traced(*args, **kwargs):
        seen.append(1)
        if len(seen) != 3:
            return real(*args, **kwargs)
        sys.setprofile(profile)
        try:
            return real(*args, **kwargs)
        finally:
            sys.setprofile(None)

    monkeypatch.setattr(train, "train_step", traced)
    train.main(argv)
    assert len(seen) == 4
    return calls


@pytest.mark.parametrize("extra", [[], ["--no-cache-tower3"], ["--accum-freq", "2"]],
                         ids=["cached-h", "h-every-step", "accumulation"])
def test_one_3t_step_runs_in_three_files(tmp_path, monkeypatch, tower3_file, extra):  # noqa: F811
    calls = functions_of_one_step(monkeypatch, tiny(
        tmp_path, "--mode", "3t", "--steps", "4", "--tower3", tower3_file, "--eval-data", "none",
        *extra))
    files = {f for f, _ in calls}
    assert files <= STEP_FILES, sorted(c for c in calls if c[0] not in STEP_FILES)
    names = {name for _, name in calls}
    # the step's parts are all there: the towers, L_3T, the update with its schedule, the clamp
    assert {"train_step", "ThreeTowers.forward", "tower_loss", "contrastive_loss", "adamw_update",
            "lr_factor", "ThreeTowers.clamp_temperatures_"} <= names
    if "--no-cache-tower3" in extra:
        assert "FrozenTower.forward" in names
    if "--accum-freq" in extra:
        assert "accumulated_backward" in names
