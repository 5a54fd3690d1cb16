"""Bad input, tried as a new user would, through the scripts' entry points (in-process, to stay fast):
every case ends with a one-line message and a non-zero exit, before any work is lost, and a pickle that
asks to run code is refused without running it. (NaN recovery and the log rewrite: tests/method/test_train.py.)"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import edit
import eval as evaluation
import sample
import softtokens
import train
from shapes import backbones

torch.set_num_threads(1)
FAST = ["--random-init", "--batch", "2", "--threads", "1", "--workers", "1"]


def one_line_error(fn, argv):
    """Run a script's main; it must exit non-zero with a message of one line. Returns the message."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    message = str(e.value.code) if not isinstance(e.value.code, int) else ""
    assert e.value.code not in (0, None), "exited 0"
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


def parser_refusal(fn, argv, capsys):
    """Run a script's main; its parser must refuse the command line in two lines of stderr (flags.Parser),
    exit status 2. Returns the error line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 2 and "Traceback" not in lines[1], lines
    return lines[1]


class Payload:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "released"
    folder.mkdir()
    torch.save({"tokens": Payload(marker)}, folder / "dc_tokens.pth")
    torch.save({"tokens": Payload(marker)}, folder / "soft_tokens.pth")
    torch.save({"config": Payload(marker)}, tmp_path / "evil-ckpt.pt")
    yield folder, tmp_path / "evil-ckpt.pt"
    assert not marker.exists(), "the pickle's payload ran"


# -----------------------------------------------------------------------------
# train.py


@pytest.mark.parametrize(
    "argv, first_words",
    [
        (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
        (["--steps", "-5"], "argument --steps: expected an integer >= 1, got '-5'"),
        (["--batch", "0"], "argument --batch: expected an integer >= 1"),
        (["--lr", "-1"], "argument --lr: expected a finite number > 0"),
    ],
)
def test_train_rejects_bad_numbers_before_loading(tmp_path, monkeypatch, capsys, argv, first_words):
    monkeypatch.setattr(train.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(backbones, "build_tiny", lambda *a, **k: pytest.fail("the model was built"))
    message = parser_refusal(train.main, ["--model", "tiny-sd3", "--out", str(tmp_path / "r")] + argv, capsys)
    assert first_words in message


def test_train_refuses_a_malicious_checkpoint_without_running_it(tmp_path, malicious):
    _, evil = malicious
    message = one_line_error(
        train.main, FAST + ["--model", "tiny-sd3", "--resume", str(evil), "--out", str(tmp_path / "r")]
    )
    assert message.startswith(f"--resume {evil}: refused") and "weights_only" not in message


@pytest.mark.parametrize("content", [b"\x00\x01garbage" * 10, "truncated"])
def test_train_resume_from_a_broken_checkpoint(tmp_path, content):
    out = tmp_path / "r"
    if content == "truncated":
        train.main(FAST + ["--model", "tiny-sd3", "--loss", "dsm", "--steps", "1", "--out", str(out)])
        whole = (out / "ckpt.pt").read_bytes()
        (out / "ckpt.pt").write_bytes(whole[: len(whole) // 2])
    else:
        out.mkdir()
        (out / "ckpt.pt").write_bytes(content)
    message = one_line_error(train.main, FAST + ["--model", "tiny-sd3", "--resume", "latest", "--out", str(out)])
    assert message.startswith(f"--resume {out / 'ckpt.pt'}: not a readable checkpoint")


def test_train_resume_takes_the_loss_from_the_checkpoint_and_clears_stale_tmp(tmp_path):
    out = tmp_path / "r"
    train.main(FAST + ["--model", "tiny-sd3", "--loss", "softrepa", "--steps", "1", "--out", str(out)])
    (out / "ckpt.pt.tmp").write_bytes(b"half a write")
    result = train.main(FAST + ["--model", "tiny-sd3", "--steps", "2", "--resume", "latest", "--out", str(out)])
    assert result["step"] == 2 and isinstance(result["tokens"], softtokens.SoftTokens)  # softrepa, not agsm
    assert not (out / "ckpt.pt.tmp").exists()


def write_jsonl(tmp_path, lines):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_train_malformed_jsonl_names_the_line(tmp_path):
    path = write_jsonl(tmp_path, ['{"image": "a.png", "caption": "a red circle"}', '{"image": "a.png", "caption": '])
    message = one_line_error(train.main, FAST + ["--model", "tiny-sd3", "--data", path, "--out", str(tmp_path / "r")])
    assert message.startswith(f"{path}:2: not JSON")


def test_train_long_or_foreign_caption_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "build_tiny", lambda *a, **k: pytest.fail("the model was built"))
    long = "a red circle and a blue square and a green triangle and a white square and a yellow circle"
    path = write_jsonl(
        tmp_path, ['{"image": "a.png", "caption": "a red circle"}', json.dumps({"image": "a.png", "caption": long})]
    )
    message = one_line_error(train.main, FAST + ["--model", "tiny-sd3", "--data", path, "--out", str(tmp_path / "r")])
    assert message.startswith(f"--data {path}: the caption") and "too long: 19 words, at most 14" in message


def test_train_unwritable_out_fails_at_start(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    message = one_line_error(train.main, FAST + ["--model", "tiny-sd3", "--out", str(tmp_path / "file" / "run")])
    assert message.startswith(f"--out {tmp_path / 'file' / 'run'}: cannot write there")


def test_offline_real_model_error_names_what_was_passed(tmp_path):
    message = one_line_error(
        train.main,
        [
            "--model",
            "sd3",
            "--pretrained",
            str(tmp_path / "nowhere"),
            "--data",
            "shapes",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert message.startswith(f"--pretrained {tmp_path / 'nowhere'}: no such file or folder")
    (tmp_path / "empty").mkdir()
    message = one_line_error(
        train.main,
        ["--model", "sd3", "--pretrained", str(tmp_path / "empty"), "--data", "shapes", "--out", str(tmp_path / "r")],
    )
    assert (
        message.startswith(f"--pretrained {tmp_path / 'empty'}: is an empty folder; expected a local copy of")
        and "pass --pretrained" not in message
    )


# -----------------------------------------------------------------------------
# sample.py and edit.py

SAMPLE = ["--model", "tiny-sd3", "--random-init", "--steps", "2", "--size", "16", "--threads", "1"]


def test_sample_refuses_malicious_released_tokens(tmp_path, malicious):
    folder, _ = malicious
    message = one_line_error(
        sample.main, SAMPLE + ["--prompt", "a red circle", "--tokens", str(folder), "--out", str(tmp_path / "s")]
    )
    assert (
        message.startswith("--tokens ") and "refused, its pickle asks for" in message and "weights_only" not in message
    )


def test_sample_unwritable_out_fails_before_sampling(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(sample.sampler, "generate", lambda *a, **k: pytest.fail("sampled before checking --out"))
    message = one_line_error(sample.main, SAMPLE + ["--prompt", "a red circle", "--out", str(tmp_path / "file" / "s")])
    assert message.startswith(f"--out {tmp_path / 'file' / 's'}: cannot write there")


def test_sample_empty_prompt_is_fine(tmp_path):
    assert sample.main(SAMPLE + ["--prompt", "", "--out", str(tmp_path / "s")]) is None or True
    assert (tmp_path / "s" / "records.jsonl").exists()


def test_sample_malformed_prompts_jsonl_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle"}\n{"prompt": \n')
    message = one_line_error(sample.main, SAMPLE + ["--prompts", str(path), "--out", str(tmp_path / "s")])
    assert message.startswith(f"{path}:2: not JSON")


EDIT = [
    "--model",
    "tiny-sd3",
    "--random-init",
    "--steps",
    "2",
    "--threads",
    "1",
    "--src",
    "a red circle",
    "--tgt",
    "a blue circle",
]


def test_edit_refuses_malicious_tokens_and_unwritable_out(tmp_path, malicious, monkeypatch):
    folder, _ = malicious
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in.png")
    message = one_line_error(
        edit.main, EDIT + ["--image", str(tmp_path / "in.png"), "--tokens", str(folder), "--out", str(tmp_path / "e")]
    )
    assert message.startswith("--tokens ") and "refused, its pickle asks for" in message
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(edit, "edit", lambda *a, **k: pytest.fail("edited before checking --out"))
    message = one_line_error(
        edit.main, EDIT + ["--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "file" / "e")]
    )
    assert message.startswith(f"--out {tmp_path / 'file' / 'e'}: cannot write there")


# -----------------------------------------------------------------------------
# eval.py


def test_eval_empty_folder_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    message = one_line_error(evaluation.main, ["--runs", str(tmp_path / "empty"), "--metrics", "shapes"])
    assert message.endswith(
        "empty: no records.jsonl, so no images to score: pass folders written by sample.py "
        "(records.jsonl + images), or edit.py --bench folders with --bench DIR"
    )


def test_eval_malformed_records_and_missing_images(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text('{"image": "images/0.png", "prompt": "a red circle"}\nnot json\n')
    message = one_line_error(evaluation.main, ["--runs", str(run), "--metrics", "shapes"])
    assert message.startswith(f"{run / 'records.jsonl'}:2: not JSON")
    spec = {"category": "single_object", "objects": [{"shape": "circle", "color": "red"}]}
    (run / "records.jsonl").write_text(
        json.dumps({"image": "images/0.png", "prompt": "a red circle", "spec": spec, "seed": 0, "variant": "plain"})
        + "\n"
    )
    message = one_line_error(evaluation.main, ["--runs", str(run), "--metrics", "shapes", "--recompute"])
    assert message.startswith(f"cannot read the image {run / 'images' / '0.png'}")


def test_eval_refuses_malicious_tokens_of_a_run(tmp_path, malicious, monkeypatch):
    folder, _ = malicious
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(run / "images" / "0.png")
    (run / "records.jsonl").write_text(
        json.dumps(
            {"image": "images/0.png", "prompt": "a red circle", "seed": 0, "variant": "tokens", "tokens": str(folder)}
        )
        + "\n"
    )
    tiny = backbones.build_tiny("tiny-sd3")
    monkeypatch.setattr(evaluation.backbones, "load", lambda *a, **kw: tiny)
    message = one_line_error(
        evaluation.main, ["--runs", str(run), "--metrics", "classifier", "--model", "tiny-sd3", "--classifier-n", "1"]
    )
    assert message.startswith("--tokens ") and "refused, its pickle asks for" in message


def test_importers_refuse_malicious_pickles(malicious):
    folder, _ = malicious
    for importer in (
        lambda: softtokens.import_softrepa(str(folder)),
        lambda: softtokens.import_agsm(str(folder)),
    ):
        with pytest.raises(SystemExit) as e:
            importer()
        message = str(e.value)
        assert message.startswith("--tokens ") and "refused, its pickle asks for" in message and "\n" not in message


# -----------------------------------------------------------------------------
# What a researcher met on the real-model path (issue: the researcher's path)


@pytest.mark.parametrize("value", ["nan", "inf", "-1e-3"])
def test_train_refuses_a_learning_rate_that_is_not_a_finite_positive_number(tmp_path, capsys, value):
    argv = FAST + ["--model", "tiny-sd3", f"--lr={value}", "--out", str(tmp_path / "r")]
    assert "argument --lr: expected a finite number > 0" in parser_refusal(train.main, argv, capsys)


def test_sample_refuses_a_token_file_holding_nan(tmp_path):
    bb = backbones.build_tiny("tiny-sd3")
    tokens = softtokens.make_tokens(bb, "softrepa")
    with torch.no_grad():
        tokens.tokens[0, 0, 0] = float("nan")
    softtokens.save(str(tmp_path / "t.safetensors"), tokens, model="tiny-sd3")
    message = one_line_error(
        sample.main,
        [
            "--model",
            "tiny-sd3",
            "--random-init",
            "--tokens",
            str(tmp_path / "t.safetensors"),
            "--prompt",
            "a red circle",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert "non-finite" in message and not (tmp_path / "s").exists()


@pytest.mark.parametrize("loss", ["softrepa", "agsm"])
def test_contrastive_losses_refuse_a_batch_of_one(tmp_path, loss):
    message = one_line_error(
        train.main,
        [
            "--model",
            "tiny-sd3",
            "--random-init",
            "--loss",
            loss,
            "--batch",
            "1",
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "1",
        ],
    )
    assert "--batch 2 or more" in message


def test_a_second_run_into_a_held_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "lock").write_text(str(holder.pid))  # a live run holds the folder
        message = one_line_error(train.main, FAST + ["--model", "tiny-sd3", "--steps", "1", "--out", str(out)])
        assert "in use by another run" in message and str(holder.pid) in message
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale, and the run (or a resume) goes ahead
    result = train.main(FAST + ["--model", "tiny-sd3", "--steps", "1", "--out", str(out), "--resume", "latest"])
    assert result["step"] == 1


def test_eval_refuses_an_unwritable_output_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation.backbones, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("not a folder")
    target = str(tmp_path / "file" / "protocol.json")
    message = one_line_error(evaluation.main, ["--protocol", "dev", "--model", "tiny-sd3", "--json", target])
    assert (
        message.startswith(f"--json {target}: its folder")
        and "is a text file; expected a folder to write to" in message
    )
