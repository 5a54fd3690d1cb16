"""run.py: the run between steps, on its own, without a model."""

import csv
import json
import os
import types

import numpy as np
import pytest
import torch

import recipe
import run

# The run between steps, on its own, without a model: a checkpoint round-trips and anything else is refused
# in one line; --resume fills the run's own settings, refuses a contradicting one, records a changed lr, and
# leaves a setting newer than the checkpoint to its default; the log forgets the rows after the checkpoint.
# (Whole-run checks -- kill and resume, the lock, NaN recovery: test_train.py, test_bad_inputs.py.)


def args_like(out, **given):
    values = {key: None for key in recipe.RESUMED}
    values.update(given)
    return types.SimpleNamespace(out=str(out), resume="latest", **values)


def write_checkpoint(out, **config):
    os.makedirs(out, exist_ok=True)
    run.save_checkpoint(
        os.path.join(out, "ckpt.pt"), dict(tokens={"t": torch.ones(2)}, step=3, config=json.dumps(config))
    )


def test_a_checkpoint_round_trips_and_a_foreign_file_is_refused(tmp_path):
    write_checkpoint(tmp_path, lr=1e-3)
    state = run.read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] == 3 and torch.equal(state["tokens"]["t"], torch.ones(2))
    assert not (tmp_path / "ckpt.pt.tmp").exists()  # written beside, then renamed
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="is a PyTorch file holding a dict; expected a ckpt.pt"):
        run.read_checkpoint(str(tmp_path / "other.pt"))
    rng = np.random.default_rng(0)
    for _ in range(50):  # random bytes trip the unpickler in many ways (IndexError, KeyError, ...): one line
        (tmp_path / "noise.pt").write_bytes(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
        with pytest.raises(SystemExit, match="not a readable checkpoint"):
            run.read_checkpoint(str(tmp_path / "noise.pt"))


def test_resume_takes_the_runs_settings_and_refuses_a_contradiction(tmp_path):
    saved = {key: None for key in recipe.RESUMED}
    saved.update(model="tiny-sd3", loss="agsm", batch=4, lr=1e-3, **run.provenance())  # made by this code
    del saved["params"]  # a checkpoint older than --params
    write_checkpoint(tmp_path, **saved)
    args = args_like(tmp_path)
    run.resume_config(args)
    assert (args.model, args.loss, args.batch) == ("tiny-sd3", "agsm", 4)
    assert args.params is None  # left to resolve(): the default, tokens
    lower = args_like(tmp_path, lr=1e-4)
    run.resume_config(lower)
    assert lower.changes == [{"step": 3, "lr": 1e-4, "was": 1e-3}]
    with pytest.raises(SystemExit, match="that run has batch=4, this one 8"):
        run.resume_config(args_like(tmp_path, batch=8))


def test_config_records_the_commit_and_a_resume_by_other_code(tmp_path):
    saved = {key: None for key in recipe.RESUMED}
    saved.update(model="tiny-sd3", loss="agsm", batch=4, lr=1e-3, commit="0" * 40, dirty=False)
    write_checkpoint(tmp_path, **saved)
    args = args_like(tmp_path)
    run.resume_config(args)
    here = run.provenance()
    assert (args.commit, args.dirty) == (here["commit"], here["dirty"])
    assert len(here["commit"]) == 40 or here["commit"] == "unknown"
    now = here["commit"] + ("+changes" if here["dirty"] else "")
    assert args.changes == [{"step": 3, "commit": now, "was": "0" * 40}]


def test_the_log_forgets_the_rows_after_the_checkpoint(tmp_path):
    args = types.SimpleNamespace(out=str(tmp_path), lr=1e-3)
    record = run.open_log(args, ["step", "loss"], 0, True)
    for step in (1, 2, 3, 4):
        record({"step": step, "loss": 1.0 / step})
    run.open_log(args, ["step", "loss"], 2, True)({"step": 3, "loss": 0.5})  # resumed at step 2
    with open(tmp_path / "log.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]
