"""whole.py / train.py --params all: the whole denoiser trains through the same step, its file is read
and put on a backbone by trained.py (and taken off again), a resumed run ends where an uninterrupted one
does, and AGSM is refused in one line."""

import pytest
import torch

import sampler
import train
import trained
import whole
from shapes import backbones

FAST = ["--random-init", "--batch", "2", "--threads", "1", "--workers", "1", "--model", "tiny-sd3", "--data", "shapes"]


def test_whole_denoiser_trains_and_its_file_samples_through_trained(tmp_path):
    result = train.main(FAST + ["--params", "all", "--loss", "dsm", "--steps", "2", "--out", str(tmp_path / "r")])
    path = result["tokens_path"]
    assert path.endswith("denoiser.safetensors") and whole.is_whole_file(path)
    bb = backbones.load("tiny-sd3", random_init=True)
    before = {k: v.clone() for k, v in bb.denoiser.state_dict().items()}
    loaded = trained.read(path, "tiny-sd3")
    assert loaded.token_set == "all"
    plain = sampler.generate(bb, ["a red square"], [0], steps=2)
    with trained.attached(bb, loaded) as handle:
        # the trained weights are the run's (the same random init, then 2 updates): not the base's
        assert any(not torch.equal(before[k], v) for k, v in bb.denoiser.state_dict().items())
        moved = sampler.generate(bb, ["a red square"], [0], steps=2, handle=handle)
        with pytest.raises(SystemExit, match="one set of weights"):
            with handle.rows(torch.tensor([0, -1])):
                pass
    assert all(torch.equal(before[k], v) for k, v in bb.denoiser.state_dict().items())  # taken off again
    assert not torch.equal(plain, moved)
    with pytest.raises(SystemExit, match="tiny-sd3 denoiser, not tiny-sd1.5"):
        trained.read(path, "tiny-sd1.5")


def test_resume_ends_like_an_uninterrupted_run(tmp_path):
    argv = FAST + ["--params", "all", "--loss", "softrepa", "--lr-period", "1", "--ckpt-every", "1", "--lr", "1e-4"]
    uninterrupted = train.main(argv + ["--steps", "3", "--out", str(tmp_path / "a")])
    train.main(argv + ["--steps", "1", "--out", str(tmp_path / "b")])
    resumed = train.main(argv + ["--steps", "3", "--out", str(tmp_path / "b"), "--resume", "latest"])
    a, b = uninterrupted["tokens"].state_dict(), resumed["tokens"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "agsm"], "two token sets"),
        (["--loss", "dsm", "--n-tokens", "4"], "--n-tokens does nothing in this run"),
        (["--loss", "dsm", "--prompt-vectors", "2"], "--prompt-vectors does nothing in this run"),
        (["--loss", "dsm", "--distill-prefix", "some"], "--distill-prefix does nothing in this run"),
    ],
)
def test_bad_flags_fail_in_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train.main(FAST + ["--params", "all", "--steps", "1", "--out", str(tmp_path / "r")] + extra)
