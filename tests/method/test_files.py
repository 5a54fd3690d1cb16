"""files.py: one test per class of file read from the user (a bad file of that class is a one-line error
naming its path); per writer, on a real small filesystem that fills up (conftest's small_disk: skipped where it
cannot be mounted), and on a read-only one: one line, the last good file intact, no temporary file left; and what
a person does at a terminal: a device the machine lacks, Ctrl-C during a run, a disk that fills during a run --
one line, exit non-zero, the checkpoint kept and the advised command resuming it."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import disks
import pytest
import torch
from PIL import Image

import benchmarks
import counting
import data
import edit
import eval as evaluation
import families
import files
import lora
import models
import run
import sample
import sampler
import softtokens
import train
import trained
from shapes import backbones, bench, checker, pretrain

torch.set_num_threads(1)


def one_line(fn, *args, names=None):
    """fn(*args) must end in SystemExit with a one-line message; it must name `names` (a path) if given."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value.code)
    assert message and "\n" not in message and "Traceback" not in message, message
    if names is not None:
        assert str(names) in message, message
    return message


def temporaries(folder):
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def no_weights_load(monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: pytest.fail("weights were loaded"))


# -----------------------------------------------------------------------------
# Readers: one per class


def test_a_token_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "tokens.safetensors"
    path.write_bytes(b"\x00\x01 random bytes, not a header")
    message = one_line(softtokens.load, str(path), names=path)
    assert "not a readable safetensors file" in message and "expected a soft-token file" in message


def test_a_token_file_whose_metadata_is_not_json(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tokens.safetensors"
    save_file({"tokens.tokens": torch.zeros(1, 2, 3)}, str(path), metadata={"sets": "[tokens"})
    assert "its metadata is not JSON" in one_line(softtokens.load, str(path), names=path)


def test_a_lora_file_cut_short(tmp_path):
    from safetensors.torch import save_file

    whole = tmp_path / "whole.safetensors"
    save_file({"transformer.a.lora_A.weight": torch.zeros(4, 8)}, str(whole))
    cut = tmp_path / "lora.safetensors"
    cut.write_bytes(whole.read_bytes()[:-40])
    message = one_line(lora.read, str(cut), "tiny-sd3", "transformer", names=cut)
    assert "expected a LoRA file" in message


def test_a_checkpoint_that_is_not_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(os.urandom(300))
    assert "--resume" in one_line(run.read_checkpoint, str(path), names=path)
    torch.save([1, 2], path)  # readable, but no tokens / config
    assert "is a PyTorch file holding a list; expected a ckpt.pt" in one_line(
        run.read_checkpoint, str(path), names=path
    )


def test_pretrained_folder_of_another_family_is_refused_from_its_config(tmp_path, monkeypatch):
    no_weights_load(monkeypatch)
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    message = one_line(models.load, "sd3", str(folder), names=folder)
    assert "holds a StableDiffusionXLPipeline, not the StableDiffusion3Pipeline of sd3" in message
    # the right pipeline, another denoiser (a FLUX transformer under an SD3 index)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert "is a FluxTransformer2DModel, not the SD3Transformer2DModel" in one_line(models.load, "sd3", str(folder))
    (folder / "model_index.json").write_text("{not json")
    assert "not readable JSON" in one_line(models.load, "sd3", str(folder), names=folder / "model_index.json")


def test_pretrained_tiny_folder_of_another_family_is_one_line_not_pages_of_keys():
    folder = os.path.join(backbones.WEIGHTS_DIR, "tiny-sd1.5")  # the shipped UNet, given to the MM-DiT family
    message = one_line(backbones.load, "tiny-sd3", folder, names=os.path.join(folder, "denoiser.safetensors"))
    assert "do not fit tiny-sd3's denoiser" in message and len(message) < 600


def test_counter_folder_that_is_no_detector(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    message = one_line(counting.open_detector, str(tmp_path), "cpu", names=tmp_path)
    assert "is a transformers bert model folder; expected a transformers object-detector folder" in message
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "is a folder of 1 entries (config.json)" in one_line(counting.open_detector, str(tmp_path), "cpu")


def fake_cache(folder, rows=2):
    """A well-formed one-shard cache of `rows` latents (4, 2, 2) in bf16, written by hand."""
    folder.mkdir(exist_ok=True)
    meta = dict(model="tiny-sd3", size=8, store="bf16", captions_per_image=1, fields={"latents": [4, 2, 2]})
    meta.update(shards=[{"name": "shard-00000", "count": rows}], images=rows, skipped=0)
    (folder / "cache.json").write_text(json.dumps(meta))
    header = {"count": rows, "images": ["a.png"] * rows, "captions": [["a red circle"]] * rows}
    (folder / "shard-00000.json").write_text(json.dumps(header))
    (folder / "shard-00000.latents.bin").write_bytes(bytes(rows * 16 * 2))
    return folder


def test_a_cache_with_a_shard_deleted_or_cut(tmp_path):
    folder = fake_cache(tmp_path / "cache")
    assert data.open_cache(str(folder), 8, 0)["n"] == 2
    shard = folder / "shard-00000.latents.bin"
    shard.write_bytes(bytes(10))
    assert "10 bytes, not 64" in one_line(data.open_cache, str(folder), 8, 0, names=shard)
    shard.unlink()
    assert "missing; expected a shard" in one_line(data.open_cache, str(folder), 8, 0, names=shard)
    (folder / "cache.json").write_text(json.dumps({"model": "tiny-sd3"}))
    assert "lacks" in one_line(data.open_cache, str(folder), 8, 0, names=folder / "cache.json")


def test_benchmark_folders_malformed_or_empty(tmp_path):
    pie = tmp_path / "pie"
    pie.mkdir()
    (pie / "mapping_file.json").write_text('{"000": {"image_path": ')
    assert "not readable JSON" in one_line(benchmarks.read, str(pie), names=pie / "mapping_file.json")
    (pie / "mapping_file.json").write_text(json.dumps({"000": {"image_path": "a.jpg"}}))
    assert "entry '000' lacks original_prompt" in one_line(benchmarks.read, str(pie))
    div2k = tmp_path / "div2k"
    div2k.mkdir()
    (div2k / benchmarks.PROMPTS).write_text("[]")
    assert "is empty" in one_line(benchmarks.read, str(div2k), names=div2k / benchmarks.PROMPTS)


def test_records_that_are_not_json_lines(tmp_path):
    (tmp_path / "records.jsonl").write_bytes(b'{"image": "a.png"}\n\xff\xfe not text\n')
    message = one_line(evaluation.read_records, str(tmp_path), names=tmp_path / "records.jsonl")
    assert "expected JSON lines" in message or "not JSON" in message
    (tmp_path / "records.jsonl").write_text('{"image": "a.png"}\n[1]\n')
    assert ":2: not a JSON object" in one_line(evaluation.read_records, str(tmp_path))


def test_prompt_files_empty_or_not_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    assert "has no prompts" in one_line(files.read_prompt_file, str(path), names=path)
    path.write_bytes(b"\xff\xfe\x00 binary")
    assert "is a binary file of 10 bytes; expected a text file" in one_line(
        files.read_prompt_file, str(path), names=path
    )
    path.write_text('{"prompt": "a red circle"}\n{"text": "no prompt"}\n')
    assert ':2: has no "prompt" string' in one_line(files.read_prompt_file, str(path))


def test_eval_names_the_missing_shapes_spec_not_missing_images(tmp_path):
    """A folder of sample.py --prompt "a red circle": its records have no spec for the shapes metric."""
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(run / "images" / "00000.png")
    record = dict(image="images/00000.png", prompt="a red circle", seed=0, variant="plain", model="tiny-sd3")
    (run / "records.jsonl").write_text(json.dumps(record) + "\n")
    message = one_line(evaluation.main, ["--runs", str(run), "--model", "tiny-sd3", "--random-init"])
    assert "records carry no shapes spec" in message and "no images to score" not in message


# -----------------------------------------------------------------------------
# Writers, on a real small filesystem (conftest's small_disk: a tmpfs) that fills up: each library raises what
# it really raises there (torch.save a RuntimeError naming no cause, safetensors a SafetensorError, PIL and
# matplotlib an OSError). Each write: one line naming the file and the full disk, the last good file readable,
# no temporary file left.


def full_disk_keeps(path, write, read):
    """Fill the disk of `path` (which holds a good file), then `write()`: one line, and `read(path)` unchanged."""
    before = read(path)
    disks.fill(os.path.dirname(path))
    message = one_line(write, names=path)
    assert "the disk is full" in message and "kept" in message, message
    assert read(path) == before and temporaries(os.path.dirname(path)) == []
    return message


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(small_disk):
    path = str(small_disk(256) / "ckpt.pt")
    run.save_checkpoint(path, {"step": torch.tensor(1), "tokens": torch.zeros(100)})
    read = lambda p: int(torch.load(p, weights_only=True)["step"])
    bigger = {"step": torch.tensor(2), "tokens": torch.ones(10**5)}
    full_disk_keeps(path, lambda: run.save_checkpoint(path, bigger), read)


def test_torch_save_on_a_full_disk_raises_no_os_error(small_disk):
    """What files.write is up against: torch.save's own error names no cause (so it is told by its words)."""
    folder = small_disk(256)
    disks.fill(folder)
    with pytest.raises(RuntimeError) as e:
        torch.save({"tokens": torch.zeros(1000)}, str(folder / "ckpt.pt"))
    assert not isinstance(e.value, OSError) and files.place_fault(e.value) and files.disk_full(str(folder))


def test_a_full_disk_at_a_token_file_keeps_the_last_one(small_disk):
    path = str(small_disk(256) / "tokens.safetensors")
    tokens = softtokens.SoftTokens(2, 4, 8, False)
    softtokens.save(path, tokens, model="tiny-sd3")
    read = lambda p: softtokens.load(p)[0].tokens.tolist()
    full_disk_keeps(path, lambda: softtokens.save(path, softtokens.SoftTokens(2, 4, 8, True), model="tiny-sd3"), read)


def test_a_full_disk_at_a_lora_file_keeps_the_last_one(small_disk):
    path = str(small_disk(512) / "lora.safetensors")
    bb = backbones.build_tiny("tiny-sd3")
    params = lora.add(bb, 2, lora.parse_blocks(None, bb.facts))
    lora.save(path, params, bb.facts, model="tiny-sd3", loss="softrepa")
    read = lambda p: open(p, "rb").read()
    full_disk_keeps(path, lambda: lora.save(path, params, bb.facts, model="tiny-sd3", loss="dsm"), read)
    assert trained.read(path, "tiny-sd3").kind == "lora"  # and it still reads as the LoRA file it was


def write_images(folder, n=3):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle")


def test_a_full_disk_at_a_cache_shard_keeps_the_previous_cache(tmp_path, small_disk):
    write_images(tmp_path / "images")
    records = data.read_records(str(tmp_path / "images"))
    bb = backbones.build_tiny("tiny-sd3")
    out = small_disk(256) / "cache"
    data.write_cache(bb, records, str(out), 32, shard_gb=1e-6)  # one image per shard: 3 shards
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    disks.fill(out.parent)
    message = one_line(data.write_cache, bb, records, str(out), 32, 1, "bf16", 8, 1e-6)
    assert "the disk is full" in message and "shard-00000" in message
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # the previous cache, whole
    assert temporaries(out) == [] and data.open_cache(str(out), 32, 0)["n"] == 3


def test_a_full_disk_at_an_image_and_a_grid_keeps_the_last_ones(small_disk):
    folder = small_disk(256)
    image, grid = str(folder / "0.png"), str(folder / "grid.png")
    sampler.save_image(torch.zeros(3, 32, 32), image)
    sampler.save_grid(torch.zeros(4, 3, 32, 32), grid)
    read = lambda p: open(p, "rb").read()
    full_disk_keeps(image, lambda: sampler.save_image(torch.rand(3, 64, 64) * 2 - 1, image), read)
    assert one_line(sampler.save_grid, torch.rand(4, 3, 32, 32) * 2 - 1, grid, names=grid)
    assert read(grid) and Image.open(grid).size and temporaries(folder) == []


def test_a_full_disk_at_eval_json_and_plot_keeps_the_last_ones(small_disk):
    folder = small_disk(256)
    json_path, plot_path = str(folder / "eval.json"), str(folder / "eval.png")
    files.write_json(json_path, {"runs": ["a"]})
    groups = {"a": {"metrics": {"fid": {"mean": 1.0, "std": 0.1}, "imagereward": {"mean": 0.5, "std": 0.1}}}}
    evaluation.plot(groups, [], plot_path)
    read = lambda p: open(p, "rb").read()
    full_disk_keeps(json_path, lambda: files.write_json(json_path, {"runs": ["a" * 10**6]}), read)
    message = one_line(evaluation.plot, groups, [], plot_path)
    assert "the disk is full" in message and plot_path in message
    assert Image.open(plot_path).size and temporaries(folder) == []


def test_a_read_only_place_is_one_line_and_keeps_the_file(small_disk):
    folder = small_disk(64)
    path = folder / "edit.json"
    files.write_json(str(path), {"run": 1})
    disks.remount_read_only(folder)
    message = one_line(files.write_json, str(path), {"run": 2}, names=path)
    assert "Read-only file system" in message
    assert json.loads(path.read_text()) == {"run": 1} and temporaries(folder) == []


def test_data_cache_into_a_place_that_cannot_be_written_fails_before_loading(tmp_path, monkeypatch):
    write_images(tmp_path / "images", n=1)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "file" / "cache"
    argv = ["cache", "--model", "sd3", "--data", str(tmp_path / "images"), "--out", str(out)]
    assert "cannot write there" in one_line(data.main, argv, names=out)


# -----------------------------------------------------------------------------
# A sample that is not a number


def test_nan_latents_are_one_line_and_no_image(tmp_path, monkeypatch):
    assert "NaN or inf" in one_line(files.check_finite, torch.tensor([0.0, float("nan")]), "sampling")
    files.check_finite(torch.zeros(3), "sampling")  # finite: nothing to say
    monkeypatch.setattr(sampler, "sample_loop", lambda bb, x, *a, **k: x * float("inf"))
    out = tmp_path / "s"
    argv = ["--model", "tiny-sd3", "--random-init", "--threads", "1", "--prompt", "a red circle", "--out", str(out)]
    assert "NaN or inf, so no image was saved" in one_line(sample.main, argv)
    assert not (out / "images").exists() or os.listdir(out / "images") == []


def test_nan_latents_of_an_edit_are_one_line(monkeypatch):
    monkeypatch.setattr(edit, "flowedit", lambda bb, x_src, *a: (x_src * float("inf"), None))
    bb = backbones.build_tiny("tiny-sd3")
    message = one_line(edit.edit, bb, torch.zeros(3, 32, 32), "a red circle", "a blue circle", "flowedit")
    assert "editing to 'a blue circle'" in message and "NaN or inf" in message


# -----------------------------------------------------------------------------
# A person at a terminal: a device the machine does not have, Ctrl-C, a disk that fills during a run


def device_argv(script, device):
    common = ["--model", "tiny-sd3", "--device", device]
    return {
        "train": (train.main, common + ["--steps", "1"]),
        "sample": (sample.main, common + ["--prompt", "a red circle"]),
        "edit": (edit.main, common + ["--shapes-check", "1"]),
        "eval": (evaluation.main, common + ["--protocol", "eval"]),
        "bench": (bench.main, ["--model", "tiny-sd3", "--device", device]),
        "pretrain": (pretrain.main, ["--model", "tiny-sd3", "--device", device, "--steps", "1"]),
    }[script]


@pytest.mark.parametrize("script", ["train", "sample", "edit", "eval", "bench", "pretrain"])
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "banana"])
def test_a_device_the_machine_lacks_is_one_line_before_anything_loads(script, device, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing is written where the suite runs, should anything be
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine answers as this one does
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(backbones, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    main, argv = device_argv(script, device)
    message = one_line(main, argv)
    assert message.startswith(f"--device {device}") or message.startswith(f"--device '{device}'"), message
    assert (
        "no such device" if device != "banana" else "not a device name"
    ) in message and "pass one of cpu" in message


def test_the_devices_there_are_pass():
    assert models.check_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert models.check_device(f"cuda:{torch.cuda.device_count() - 1}")


def run_train(out, *flags, timeout=120):
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny-sd3", "--batch", "2", "--threads", "1"]
    return subprocess.run(
        argv + ["--out", str(out), *flags], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV
    )


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def the_command(line):
    """The argv of the command a one-line message advises ("go on with: python train.py ...")."""
    return shlex.split(line.split("go on with: ", 1)[1])


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_training_is_one_line_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, stop):
    out = tmp_path / "run"
    argv = [sys.executable, "train.py", "--model", "tiny-sd3", "--batch", "2", "--threads", "1", "--out", str(out)]
    argv += ["--steps", "100000", "--ckpt-every", "3", "--log-every", "1"]
    # a shell's background job ignores SIGINT, and a child inherits that: the run gets SIGINT's default back
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stdout:  # after the first checkpoint past step 0
        if "step 4:" in line:
            break
    proc.send_signal(getattr(signal, stop))  # Ctrl-C at a terminal; SIGTERM from kill or a scheduler
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + getattr(signal, stop) and len(lines) == 1, err
    said = "interrupted (Ctrl-C)" if stop == "SIGINT" else "stopped (SIGTERM)"
    assert lines[0].startswith(f"{said}: the last checkpoint") and "--resume latest" in lines[0]
    step = int(torch.load(out / "ckpt.pt", weights_only=True)["step"])
    assert step >= 3 and f"at step {step}" in lines[0]
    assert temporaries(out) == [] and not (out / "lock").exists()
    if stop == "SIGTERM":
        return
    command = the_command(lines[0])
    assert command[:2] == ["python", "train.py"]
    command[command.index("--steps") + 1] = str(step + 1)  # the advice, one step further
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-2000:]


def test_a_disk_that_fills_during_training_is_one_line_keeps_the_checkpoint_and_resumes(small_disk):
    folder = small_disk(1400)  # room for one checkpoint of tiny-sd3 (0.9 MB), not for the next beside it
    out = folder / "run"
    done = run_train(out, "--steps", "3", "--ckpt-every", "1")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"cannot write {out / 'ckpt.pt'} (the disk is full); the last checkpoint")
    assert int(torch.load(out / "ckpt.pt", weights_only=True)["step"]) == 0 and temporaries(out) == []
    subprocess.run(["mount", "-o", "remount,size=4m", str(folder)], check=True)  # space freed
    command = the_command(lines[0])
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0 and "at step 0" in resumed.stdout, resumed.stderr[-2000:]
    assert (out / "tokens.safetensors").exists()


# -----------------------------------------------------------------------------
# Every file a flag names, given a file of another kind: one line saying what it is and what was expected


@pytest.fixture(scope="module")
def specimens(tmp_path_factory):
    """One file or folder of each kind a flag may name, small and written here (no weights are needed to
    tell them apart: headers and configs)."""
    root = tmp_path_factory.mktemp("kinds")
    tokens = softtokens.SoftTokens(2, 4, 8, False)
    softtokens.save(str(root / "tokens.safetensors"), tokens, model="tiny-sd3")
    bb = backbones.build_tiny("tiny-sd3")
    lora.save(str(root / "lora.safetensors"), lora.add(bb, 2, lora.parse_blocks(None, bb.facts)), bb.facts)
    run.save_checkpoint(str(root / "ckpt.pt"), {"config": json.dumps({"model": "tiny-sd3"}), "tokens": {}, "step": 3})
    os.makedirs(root / "run")
    (root / "run" / "config.json").write_text("{}")
    (root / "run" / "log.csv").write_text("step\n")
    cache = fake_cache(root / "cache")
    meta = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps(dict(meta, model="sd3")))  # an sd3 cache
    Image.new("RGB", (8, 8)).save(root / "image.png")
    (root / "notes.txt").write_text("a red circle\n")
    os.makedirs(root / "detector")
    (root / "detector" / "config.json").write_text(json.dumps({"model_type": "detr"}))
    for family in ("sd3", "sd3.5-large"):  # a pipeline folder's configs, as diffusers saves them
        os.makedirs(root / family / "transformer")
        (root / family / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
        config = dict(models.denoiser_config(family, "test"), _class_name="SD3Transformer2DModel")
        (root / family / "transformer" / "config.json").write_text(json.dumps(config))
    return {
        "token file": root / "tokens.safetensors",
        "LoRA file": root / "lora.safetensors",
        "counter file": checker.COUNTER_WEIGHTS,
        "checkpoint": root / "ckpt.pt",
        "run folder": root / "run",
        "sd3 cache": cache,
        "image": root / "image.png",
        "text": root / "notes.txt",
        "detector folder": root / "detector",
        "sd3.5-large folder": root / "sd3.5-large",
    }


SD3_HUB = families.FAMILIES["sd3"]["hub"]
READERS = {  # flag -> (its reader, the specimens it takes)
    "--counter (tiny)": (lambda p: checker.load_counter(p), {"counter file"}),
    "--counter": (lambda p: counting.open_detector(p, "cpu"), {"detector folder"}),
    "--tokens": (lambda p: trained.read(p, "tiny-sd3"), {"token file", "LoRA file"}),
    "--resume": (lambda p: run.read_checkpoint(p), {"checkpoint"}),
    "--pretrained": (lambda p: models.load("sd3", pretrained=p), set()),
    "--data": (lambda p: data.open_source(p, 32, 0, model="tiny-sd3"), set()),
    "--bench": (lambda p: benchmarks.read(p), set()),
}
WORDS = {  # what the one line must call each specimen
    "token file": "is a soft-token file for tiny-sd3",
    "LoRA file": "is a LoRA file",
    "counter file": "is a shapes counter's weights",
    "checkpoint": "is a checkpoint of train.py (tiny-sd3, step 3)",
    "run folder": "is a run folder of train.py",
    "sd3 cache": "is an encoding cache of sd3",
    "image": "is a PNG image (8x8)",
    "text": "is a text file",
    "detector folder": "is a transformers detr model folder",
    "sd3.5-large folder": "is a diffusers pipeline folder (StableDiffusion3Pipeline)",
}
EXCEPTIONS = {  # where the most basic mismatch is more specific than the kind
    ("--data", "sd3 cache"): "holds sd3's encodings (latents and text features), not tiny-sd3's",
    ("--pretrained", "sd3.5-large folder"): "its transformer (qk_norm 'rms_norm', dual_attention_layers []) is "
    "sd3.5-large's, not sd3's: pass --model sd3.5-large",
    ("--data", "text"): "expected a COCO folder, a captions_*.json, a .jsonl or a folder of images",
}


@pytest.mark.parametrize("flag", list(READERS))
def test_every_file_a_flag_names_is_checked_for_its_kind(specimens, flag, monkeypatch):
    no_weights_load(monkeypatch)
    read, takes = READERS[flag]
    for name, path in specimens.items():
        if name in takes:
            continue
        message = one_line(read, str(path), names=path)
        assert message.startswith(flag.split()[0]) or (flag, name) in EXCEPTIONS, message
        assert (EXCEPTIONS.get((flag, name)) or WORDS[name]) in message, (name, message)


class Loading(Exception):
    pass


def test_the_sd3_folder_passes_as_sd3_and_the_sd35_one_as_sd35(specimens, monkeypatch):
    import diffusers

    def from_pretrained(*args, **kwargs):
        raise Loading  # the checks passed: the weights would load now

    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", from_pretrained)
    for family, folder in (("sd3", "sd3"), ("sd3.5-large", "sd3.5-large")):
        with pytest.raises(Loading):
            models.load(family, pretrained=str(specimens["sd3.5-large folder"].parent / folder))
    assert "is sd3's, not sd3.5-medium's" in one_line(
        models.load, "sd3.5-medium", str(specimens["sd3.5-large folder"].parent / "sd3")
    )


# -----------------------------------------------------------------------------
# The root cause speaks first


def test_train_with_a_token_file_as_counter_is_one_line(specimens, tmp_path):
    argv = ["--model", "tiny-sd3", "--steps", "1", "--batch", "2", "--out", str(tmp_path / "r"), "--count-weight", "1"]
    message = one_line(train.main, argv + ["--counter", str(specimens["token file"])])
    assert message.startswith(f"--counter {specimens['token file']}: is a soft-token file for tiny-sd3")
    assert "expected a shapes counter's weights" in message


def test_a_cache_of_another_family_at_another_size_names_the_family(specimens, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    cache = specimens["sd3 cache"]  # encoded for sd3 at 8 px; sd1.5 trains at 512
    argv = ["--model", "sd1.5", "--data", str(cache), "--out", str(tmp_path / "r"), "--steps", "1", "--batch", "2"]
    message = one_line(train.main, argv)
    assert message.startswith(f"--data {cache}: holds sd3's encodings") and "--model sd3" in message
    assert "px" not in message  # the size is not the cause, and following the advice meets no size refusal
    message = one_line(train.main, ["--model", "sd3", *argv[2:]])
    assert "was encoded at 8 px, training is at 512: pass --size 8" in message  # sd3: now the size is the cause


def test_data_cache_for_a_tiny_model_says_why_not_and_how_to_train(tmp_path):
    write_images(tmp_path / "images")
    argv = ["cache", "--model", "tiny-sd3", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "c")]
    message = one_line(data.main, argv)
    assert "there is nothing to save" in message and "needs no cache" not in message
    assert f"python train.py --model tiny-sd3 --data {tmp_path / 'images'}" in message
    assert "no such file or folder" in one_line(data.main, argv[:4] + [str(tmp_path / "none"), *argv[5:]])
    assert "drawn afresh every step" in one_line(data.main, argv[:4] + ["shapes", *argv[5:]])


def script_line(main):
    """files.script(main) as a script's __main__ runs it: the SystemExit's one line and exit status."""
    with pytest.raises(SystemExit) as e:
        files.script(main)
    code = e.value.code
    return (code, 1) if isinstance(code, str) else (None, code)


def test_what_a_script_meets_is_one_line(small_disk, capsys):
    def interrupted():
        os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT: Python raises KeyboardInterrupt at the next bytecode
        time.sleep(5)

    assert script_line(interrupted) == (None, 130)
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted (Ctrl-C): no file was left half-written") and "\n" not in err
    message, status = script_line(lambda: torch.empty(2**50, dtype=torch.uint8))  # the CPU allocator refuses
    assert status == 1 and message.startswith("out of memory on this machine (a tensor of 1.05e+06 GiB)")
    folder = small_disk(64)
    disks.fill(folder)

    def append_a_row():  # a log appended row by row, outside files.write
        with open(folder / "log.csv", "a") as log:
            log.write("1,0.5\n" * 10000)

    message, status = script_line(append_a_row)
    assert status == 1 and message.startswith("cannot write") and "(the disk is full)" in message
    assert "\n" not in message
    with pytest.raises(ZeroDivisionError):  # a bug is a traceback still
        files.script(lambda: 1 / 0)


def test_ctrl_c_while_caching_leaves_the_previous_cache_whole(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    records = data.read_records(str(tmp_path / "images"))
    bb = backbones.build_tiny("tiny-sd3")
    out = tmp_path / "cache"
    data.write_cache(bb, records, str(out), 32, shard_gb=1e-6)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    encode, calls = models.encode_prompts, []

    def encode_then_ctrl_c(*args, **kwargs):  # the user presses Ctrl-C while the second batch encodes
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        return encode(*args, **kwargs)

    monkeypatch.setattr(models, "encode_prompts", encode_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        data.write_cache(bb, records, str(out), 32, 1, "bf16", 1, 1e-6)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before and temporaries(out) == []
