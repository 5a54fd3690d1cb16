"""step.train_step: --rows-per-forward (the authors' --nrows) takes the same step as the whole pair
matrix at once -- tokens after the update and every logged number, within the fp32 tolerance -- for
each loss, both architectures, with and without gradient checkpointing; and a duplicate caption in a
chunk is still no negative. Then the run machinery of step.py (checkpoints, resume rules, the log)."""

import csv
import json
import os
import types
from types import SimpleNamespace

import numpy as np
import pytest
import tolerances
import torch

import families
import run
import softtokens
import step as training
import trained
from shapes import backbones

torch.set_num_threads(1)


def one_step(name, loss, rows_per_forward, checkpointing, captions):
    bb = backbones.build_tiny(name, seed=0)
    bb.denoiser.requires_grad_(False)
    if checkpointing:
        bb.denoiser.enable_gradient_checkpointing()
        bb.denoiser.train()  # diffusers checkpoints in training mode only
    recipe = SimpleNamespace(**families.default_recipe(name, loss, steps=100))
    recipe.rows_per_forward = rows_per_forward
    tokens = softtokens.make_tokens(bb, loss, seed=0)
    with torch.no_grad():  # tokens that matter, so that the step moves them visibly
        for p in tokens.parameters():
            p.normal_(0, 0.5)
    tokens.update_ema(0.0) if loss == "agsm" else None
    opt = torch.optim.AdamW(tokens.trainable(), lr=recipe.lr, weight_decay=recipe.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    batch = dict(images=torch.rand((len(captions), 3, 32, 32), generator=g) * 2 - 1, captions=captions, new_bad=0)
    handle = trained.attach(bb, tokens.sets)
    stats = training.train_step(bb, tokens, handle, opt, sched, scaler, recipe, batch, step=3)
    handle.remove()
    grads = {k: p.grad.clone() for k, p in zip(range(99), tokens.trainable())}
    return {k: v.detach().clone() for k, v in tokens.state_dict().items()}, stats, grads


CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a red square", "a white circle"]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
@pytest.mark.parametrize("loss", ["softrepa", "agsm", "dsm"])
def test_rows_per_forward_takes_the_unchunked_step(name, loss, checkpointing):
    whole, whole_stats, whole_grads = one_step(name, loss, 0, checkpointing, CAPTIONS)
    for rows in (1, 3):  # one row at a time, and an uneven split (3 + 1)
        chunked, stats, grads = one_step(name, loss, rows, checkpointing, CAPTIONS)
        # the same arithmetic in another batch layout (tolerances.py): ~1e-4 of unit-size numbers
        for k in whole_grads:
            torch.testing.assert_close(grads[k], whole_grads[k], **tolerances.REORDERED_FP32)
        for k in whole:
            torch.testing.assert_close(chunked[k], whole[k], **tolerances.REORDERED_FP32)
        for k in training.STATS:
            assert stats[k] == pytest.approx(whole_stats[k], rel=1e-4, abs=1e-5), k
    moved = one_step(name, loss, 0, checkpointing, CAPTIONS)[0]
    assert all(torch.equal(moved[k], whole[k]) for k in whole)  # deterministic: the comparison means something


@pytest.mark.parametrize("loss", ["softrepa", "agsm"])
def test_a_duplicate_caption_is_no_negative_in_any_chunk(loss):
    captions = ["a red circle", "a red circle", "a green triangle above a red square", "a white circle"]
    whole, whole_stats, _ = one_step("tiny-sd3", loss, 0, False, captions)
    chunked, stats, _ = one_step("tiny-sd3", loss, 1, False, captions)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], **tolerances.REORDERED_FP32)
    assert stats["loss"] == pytest.approx(whole_stats["loss"], rel=1e-4)


# -----------------------------------------------------------------------------
# The run between steps, on its own, without a model: a checkpoint round-trips and anything else is refused
# in one line; --resume fills the run's own settings, refuses a contradicting one, records a changed lr, and
# leaves a setting newer than the checkpoint to its default; the log forgets the rows after the checkpoint.
# (Whole-run checks -- kill and resume, the lock, NaN recovery: tests/test_train.py, tests/test_bad_inputs.py.)


def args_like(out, **given):
    values = {key: None for key in run.TRAJECTORY}
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
    with pytest.raises(SystemExit, match="not a checkpoint of train.py"):
        run.read_checkpoint(str(tmp_path / "other.pt"))
    rng = np.random.default_rng(0)
    for _ in range(50):  # random bytes trip the unpickler in many ways (IndexError, KeyError, ...): one line
        (tmp_path / "noise.pt").write_bytes(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
        with pytest.raises(SystemExit, match="not a readable checkpoint"):
            run.read_checkpoint(str(tmp_path / "noise.pt"))


def test_resume_takes_the_runs_settings_and_refuses_a_contradiction(tmp_path):
    saved = {key: None for key in run.TRAJECTORY}
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
    saved = {key: None for key in run.TRAJECTORY}
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
