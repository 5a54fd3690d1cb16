"""runs.py on its own, without a model: a checkpoint round-trips and anything else is refused in one line;
--resume fills the run's own settings, refuses a contradicting one, records a changed lr, and leaves a
setting newer than the checkpoint to its default; the log forgets the rows after the checkpoint. (The
whole-run checks -- kill and resume, the lock, NaN recovery -- are in tests/test_train.py and
tests/test_bad_inputs.py.)"""
import csv
import json
import os
import types

import pytest
import torch

import runs


def args_like(out, **given):
    values = {key: None for key in runs.TRAJECTORY}
    values.update(given)
    return types.SimpleNamespace(out=str(out), resume="latest", **values)


def write_checkpoint(out, **config):
    os.makedirs(out, exist_ok=True)
    runs.save_checkpoint(os.path.join(out, "ckpt.pt"), dict(tokens={"t": torch.ones(2)}, step=3,
                                                             config=json.dumps(config)))


def test_a_checkpoint_round_trips_and_a_foreign_file_is_refused(tmp_path):
    write_checkpoint(tmp_path, lr=1e-3)
    state = runs.read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] == 3 and torch.equal(state["tokens"]["t"], torch.ones(2))
    assert not (tmp_path / "ckpt.pt.tmp").exists()                       # written beside, then renamed
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of train.py"):
        runs.read_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "noise.pt").write_bytes(os.urandom(64))
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        runs.read_checkpoint(str(tmp_path / "noise.pt"))


def test_resume_takes_the_runs_settings_and_refuses_a_contradiction(tmp_path):
    saved = {key: None for key in runs.TRAJECTORY}
    saved.update(model="tiny-sd3", loss="agsm", batch=4, lr=1e-3)
    del saved["params"]                                   # a checkpoint older than --params
    write_checkpoint(tmp_path, **saved)
    args = args_like(tmp_path)
    runs.resume_config(args)
    assert (args.model, args.loss, args.batch) == ("tiny-sd3", "agsm", 4)
    assert args.params is None                            # left to resolve(): the default, tokens
    lower = args_like(tmp_path, lr=1e-4)
    runs.resume_config(lower)
    assert lower.changes == [{"step": 3, "lr": 1e-4, "was": 1e-3}]
    with pytest.raises(SystemExit, match="that run has batch=4, this one 8"):
        runs.resume_config(args_like(tmp_path, batch=8))


def test_the_log_forgets_the_rows_after_the_checkpoint(tmp_path):
    args = types.SimpleNamespace(out=str(tmp_path), lr=1e-3)
    record = runs.open_log(args, ["step", "loss"], 0, True)
    for step in (1, 2, 3, 4):
        record({"step": step, "loss": 1.0 / step})
    runs.open_log(args, ["step", "loss"], 2, True)({"step": 3, "loss": 0.5})   # resumed at step 2
    with open(tmp_path / "log.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]
