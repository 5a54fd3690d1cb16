"""train.py on random-weight tiny backbones: DDP keeps the tokens identical on both ranks, a resumed run
ends where an uninterrupted one does, a COCO folder with a corrupt image trains and reports it, NaN
stops the run and keeps the last good checkpoint, bad input fails at start in one line."""

import csv
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import models
import shapes
import softtokens
import train
import trained
from shapes import backbones, classifier

FAST = ["--random-init", "--batch", "2", "--threads", "1", "--workers", "1"]


def rows(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank, world, port, argv, folder):
    """One torchrun-like rank: the environment torchrun would set, then train.main in this process."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    result = train.main(argv)
    torch.save(result["tokens"].state_dict(), os.path.join(folder, f"rank{rank}.pt"))


def test_two_rank_gloo_run_keeps_tokens_identical(tmp_path):
    out = str(tmp_path / "run")
    argv = FAST + ["--model", "tiny-sd3", "--loss", "agsm", "--steps", "2", "--out", out]
    # a one-process run of the same command first: it is compared with below, and it imports diffusers
    # here, so that the forked ranks inherit it (importing it anew costs ~15 s on this machine)
    single = train.main(
        FAST + ["--model", "tiny-sd3", "--loss", "agsm", "--steps", "2", "--out", str(tmp_path / "one")]
    )
    mp.start_processes(run_rank, args=(2, free_port(), argv, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # training happened, and both ranks' data went into it: a one-process run differs

    saved, meta = softtokens.load(os.path.join(out, "tokens.safetensors"))
    assert meta["world"] == 2 and meta["loss"] == "agsm" and meta["steps"] == 2
    assert torch.equal(saved.pos.tokens, ranks[0]["pos.tokens"])
    assert not torch.equal(single["tokens"].pos.tokens, ranks[0]["pos.tokens"])
    assert [r["step"] for r in rows(out)] == ["1", "2"]


@pytest.mark.parametrize("model, loss", [("tiny-sd1.5", "agsm"), ("tiny-sd3", "dsm")])
def test_resume_ends_like_an_uninterrupted_run(tmp_path, model, loss):
    # schedule period and EMA decay given explicitly: their defaults derive from --steps
    argv = FAST + ["--model", model, "--loss", loss, "--lr-period", "1", "--ckpt-every", "1"]
    argv += ["--ema-decay", "0.9"] if loss == "agsm" else []
    whole = train.main(argv + ["--steps", "4", "--out", str(tmp_path / "whole")])
    first = train.main(argv + ["--steps", "2", "--out", str(tmp_path / "split")])
    first_tokens = {k: v.clone() for k, v in first["tokens"].state_dict().items()}
    resumed = train.main(argv + ["--steps", "4", "--out", str(tmp_path / "split"), "--resume", "latest"])
    assert resumed["step"] == 4
    a, b = whole["tokens"].state_dict(), resumed["tokens"].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
        assert not torch.equal(first_tokens[name], b[name]) or "ema" in name, name  # steps 3-4 did move them
    # the log of the split run has every step once, and its numbers match the whole run's
    split, full = rows(str(tmp_path / "split")), rows(str(tmp_path / "whole"))
    assert [r["step"] for r in split] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in split] == [r["loss"] for r in full]
    # a resumed run is the same run: a contradicting recipe flag is refused in one line
    with pytest.raises(SystemExit, match="batch=2"):
        train.main(argv + ["--steps", "6", "--batch", "3", "--out", str(tmp_path / "split"), "--resume", "latest"])


def write_coco(root, n_images=4, corrupt=1, year="2017"):
    from PIL import Image

    os.makedirs(root / "annotations")
    os.makedirs(root / f"train{year}")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(n_images):
        name = f"{i:012d}.jpg" if year == "2017" else f"COCO_train{year}_{i:012d}.jpg"
        path = root / f"train{year}" / name
        if i < corrupt:
            path.write_bytes(b"\xff\xd8\xff this is not a jpeg")
        else:
            array = rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)
            Image.fromarray(array).save(path)
        images.append({"id": 100 + i, "file_name": name, "height": 40, "width": 56})
        annotations += [
            {
                "id": 10 * i + k,
                "image_id": 100 + i,
                "caption": [
                    "a red square",
                    "two red squares",
                    "a red square above a blue circle",
                    "some squares",
                    "a square",
                ][k],
            }
            for k in range(5)
        ]
    with open(root / "annotations" / f"captions_train{year}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)


def test_coco_folder_with_a_corrupt_image_trains_and_reports_it(tmp_path, capsys):
    write_coco(tmp_path / "coco")
    out = str(tmp_path / "run")
    # 4 images, batch 2: each epoch is 2 steps, so 4 steps read every image twice
    result = train.main(
        FAST
        + ["--model", "tiny-sd3", "--loss", "softrepa", "--steps", "4", "--data", str(tmp_path / "coco"), "--out", out]
    )
    assert result["step"] == 4 and result["skipped"] == 1  # counted once, though met in both epochs
    assert [r["skipped"] for r in rows(out)][-1] == "1"
    captured = capsys.readouterr()
    assert "skipping unreadable image" in captured.err and "000000000000.jpg" in captured.err
    assert "1 unreadable images skipped" in captured.out
    assert os.path.exists(os.path.join(out, "tokens.safetensors"))


def diverging_updates(monkeypatch):
    """AdamW steps that throw the tokens to inf: a diverged update (an --lr of 1e30 did it before the
    parser refused such an lr, flags.py)."""
    adamw_step = torch.optim.AdamW.step

    def diverged(self, *args, **kwargs):
        result = adamw_step(self, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", diverged)


def test_divergence_stops_keeps_the_last_good_state_and_resumes_with_a_lower_lr(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    argv = FAST + ["--model", "tiny-sd3", "--loss", "dsm", "--ckpt-every", "1", "--out", out]
    train.main(argv + ["--steps", "2"])  # two good steps
    # from step 2 on, the update throws the tokens to inf
    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        diverging_updates(patched)
        train.main(argv + ["--steps", "4", "--resume", "latest"])
    printed = capsys.readouterr().out
    assert "diverged" in printed and "Last good checkpoint" in printed and "--lr <lower>" in printed
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["tokens"].values())
    # the advice can be followed: resume from the good state with a lower lr, to the end, finite
    done = train.main(argv + ["--steps", "4", "--lr", "1e-4", "--resume", "latest"])
    assert done["step"] == 4 and all(torch.isfinite(p).all() for p in done["tokens"].parameters())
    config = json.load(open(os.path.join(out, "config.json")))
    # the changes are recorded with their step (the diverged attempt left no state, so no record either): the
    # run's --steps extended from 2 to 4, then the lower lr
    assert config["changes"] == [{"step": 2, "steps": 4, "was": 2}, {"step": 2, "lr": 1e-4, "was": 1e-3}]
    assert config["lr"] == 1e-4
    assert [r["step"] for r in rows(out)] == ["1", "2", "3", "4"]


def test_nan_from_the_first_update_keeps_the_initial_state(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    diverging_updates(monkeypatch)
    with pytest.raises(SystemExit):
        train.main(FAST + ["--model", "tiny-sd3", "--loss", "dsm", "--steps", "3", "--out", out])
    assert "Last good checkpoint" in capsys.readouterr().out
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 0 and not os.path.exists(os.path.join(out, "tokens.safetensors"))


def test_a_kill_during_the_log_rewrite_loses_no_row(tmp_path, monkeypatch):
    """Resuming rewrites log.csv without the rows after the checkpoint: into a new file renamed over the
    old one. A kill before the rename (simulated: os.replace fails) leaves the old log whole."""
    out = str(tmp_path / "run")
    argv = FAST + ["--model", "tiny-sd3", "--loss", "dsm", "--ckpt-every", "2", "--out", out]
    train.main(argv + ["--steps", "3"])  # log rows 1-3, checkpoint at step 2 ... and 3
    before = open(os.path.join(out, "log.csv")).read()
    real_replace = os.replace

    def killed(src, dst):
        if dst.endswith("log.csv"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(train.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv + ["--steps", "5", "--resume", "latest"])
    assert open(os.path.join(out, "log.csv")).read() == before
    monkeypatch.setattr(train.os, "replace", real_replace)
    train.main(argv + ["--steps", "5", "--resume", "latest"])  # and a clean resume continues the log
    assert [r["step"] for r in rows(out)] == ["1", "2", "3", "4", "5"]


def test_validation_writes_shapes_scores_and_a_grid(tmp_path):
    out = str(tmp_path / "run")
    train.main(
        FAST
        + [
            "--model",
            "tiny-sd1.5",
            "--loss",
            "softrepa",
            "--steps",
            "2",
            "--val-every",
            "2",
            "--val-n",
            "1",
            "--val-steps",
            "3",
            "--out",
            out,
        ]
    )
    log = rows(out)
    assert [r["step"] for r in log] == ["0", "1", "2"]  # step 0: the untrained tokens
    for r in (log[0], log[2]):  # one prompt per category: each score is that image's verdict, 0 or 1
        per_category = [float(r[f"score_{c}"]) for c in shapes.CATEGORIES]
        assert set(per_category) <= {0.0, 1.0}
        assert float(r["score_mean"]) == pytest.approx(np.mean(per_category), abs=1e-5)
    assert log[1]["score_mean"] == ""  # no validation at step 1, and no fake number
    assert log[1]["heldout_acc"] == ""
    # the logged held-out accuracy at step 2 is that of the saved tokens, recomputed here
    bb = backbones.build_tiny("tiny-sd1.5", seed=0)
    handle = trained.attach(bb, trained.read(os.path.join(out, "tokens.safetensors"), "tiny-sd1.5"))
    records = [
        r for c in shapes.CATEGORIES for r in [r for r in shapes.load_dev_set() if r["spec"]["category"] == c][:1]
    ]
    try:
        expected = classifier.classifier_accuracy(bb, records, n_candidates=4, seed=0, handle=handle)
    finally:
        handle.remove()
    assert float(log[2]["heldout_acc"]) == pytest.approx(expected, abs=1e-5)
    assert sorted(os.listdir(os.path.join(out, "val"))) == ["step0000000.png", "step0000002.png"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "sd4"], "unknown model 'sd4'"),
        (["--model", "sd3", "--random-init"], "--random-init"),
        (["--model", "tiny-sd3", "--loss", "dsm", "--gather-text"], "--gather-text"),
        (["--model", "tiny-sd3", "--data", "/no/such/coco"], "/no/such/coco: no such file"),
        (["--model", "tiny-sd3", "--resume", "/no/such/ckpt.pt"], "no such checkpoint"),
    ],
)
def test_bad_input_fails_at_start_in_one_line(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "run")])
    assert message in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# The authors' recipe where the papers are silent (AGSM / SoftREPA train.py)


def resolved(*argv):
    args = train.parse_args(["--model", "tiny-sd3"] + list(argv))
    args.world = 1
    train.resolve(args)
    return args


def test_schedule_and_ema_rules_reproduce_the_authors_runs_and_scale():
    # at the papers' lengths: their scheduler period and their EMA decay
    assert resolved("--loss", "agsm", "--steps", "100000").lr_period == 1000  # train_coco.sh --num_iter
    assert resolved("--loss", "softrepa", "--steps", "30000").lr_period == 500
    assert resolved("--loss", "agsm", "--steps", "100000").ema_decay == pytest.approx(0.9999)
    # a 2,000-step run: the same number of periods (100) and the same EMA horizon fraction (a tenth)
    short = resolved("--loss", "agsm", "--steps", "2000")
    assert short.lr_period == 20 and short.ema_decay == pytest.approx(0.995)
    # CosineAnnealingWarmRestarts(T_0=10, eta_min) stepped once per period: constant within a period,
    # a cosine over 10 periods, then a restart
    ratio = 1e-5 / 1e-3
    lrs = [train.lr_at_step(s, 50, ratio) for s in range(0, 1100)]
    assert lrs[0] == 1.0 and lrs[49] == 1.0 and lrs[50] < 1.0
    assert lrs[50 * 5] == pytest.approx(ratio + (1 - ratio) / 2)  # half way down the cosine
    assert lrs[50 * 10] == 1.0 and lrs[50 * 9] < 0.05  # restart after 10 periods
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), T_0=10, eta_min=ratio
    )
    for e in range(25):  # the torch scheduler itself
        if 50 * e < len(lrs):
            assert lrs[50 * e] == pytest.approx(torch_sched.get_last_lr()[0], rel=1e-9)
        torch_sched.step()
    assert resolved("--loss", "agsm").tau == 0.1 and resolved("--loss", "softrepa").tau == 0.07


@pytest.mark.parametrize("per_row", [False, True])
def test_one_t_and_one_noise_per_step_unless_per_row(tmp_path, monkeypatch, per_row):
    seen = []
    real = models.add_noise

    def spy(bb, x0, noise, u):
        seen.append((noise.clone(), u.clone()))
        return real(bb, x0, noise, u)

    monkeypatch.setattr(train.models, "add_noise", spy)
    train.main(
        FAST
        + ["--model", "tiny-sd3", "--loss", "softrepa", "--batch", "3", "--steps", "2", "--out", str(tmp_path / "run")]
        + (["--noise-per-row"] if per_row else [])
    )
    for noise, u in seen:
        same = bool((u == u[0]).all()) and all(torch.equal(noise[0], n) for n in noise)
        assert same != per_row
