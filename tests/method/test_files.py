"""files.py: one test per class of file read from the user (a bad file of that class is a one-line error
naming its path), and per failing write (a read-only place; a full disk, simulated, at a checkpoint, a
token file and a cache shard): one line, the previous file intact, no temporary file left."""

import errno
import json
import os

import pytest
import torch
from PIL import Image

import benchmarks
import counting
import data
import edit
import eval as evaluation
import files
import lora
import models
import run
import sample
import sampler
import softtokens
from shapes import backbones

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
    assert "not a checkpoint of train.py" in one_line(run.read_checkpoint, str(path), names=path)


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
    assert "'bert' model, not an object detector" in message
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "holds a JSON list" in one_line(counting.open_detector, str(tmp_path), "cpu")


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
    assert "not readable text" in one_line(files.read_prompt_file, str(path), names=path)
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
# Writers: a read-only place, a full disk


def full_disk(write_some):
    """A stand-in for a library's writer that writes part of the file, then finds the disk full."""

    def writer(*args, **kwargs):
        write_some(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    return writer


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    run.save_checkpoint(path, {"step": torch.tensor(1)})
    before = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", full_disk(lambda blob, tmp: open(tmp, "wb").write(b"half a checkpoint")))
    message = one_line(run.save_checkpoint, path, {"step": torch.tensor(2)}, names=path)
    assert "the disk is full" in message and "kept" in message
    assert open(path, "rb").read() == before and temporaries(tmp_path) == []


def test_a_full_disk_at_a_token_file_keeps_the_last_one(tmp_path, monkeypatch):
    import safetensors.torch

    path = str(tmp_path / "tokens.safetensors")
    tokens = softtokens.SoftTokens(2, 4, 8, False)
    softtokens.save(path, tokens, model="tiny-sd3")
    before = open(path, "rb").read()
    monkeypatch.setattr(
        safetensors.torch, "save_file", full_disk(lambda t, tmp, metadata=None: open(tmp, "wb").write(b"half"))
    )
    assert "the disk is full" in one_line(softtokens.save, path, tokens, names=path)
    assert open(path, "rb").read() == before and temporaries(tmp_path) == []
    assert softtokens.load(path)[1]["model"] == "tiny-sd3"


def write_images(folder, n=3):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle")


def test_a_full_disk_at_a_cache_shard_keeps_the_previous_cache(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    records = data.read_records(str(tmp_path / "images"))
    bb = backbones.build_tiny("tiny-sd3")
    out = tmp_path / "cache"
    data.write_cache(bb, records, str(out), 32, shard_gb=1e-6)  # one image per shard: 3 shards
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    reserved = []

    def fallocate(fd, offset, length):  # the second shard's space cannot be reserved (3 fields a shard)
        reserved.append(length)
        if len(reserved) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    message = one_line(data.write_cache, bb, records, str(out), 32, 1, "bf16", 8, 1e-6)
    assert "the disk is full" in message and "shard-00001.latents.bin" in message
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # the previous cache, whole
    assert temporaries(out) == [] and data.open_cache(str(out), 32, 0)["n"] == 3


def test_a_read_only_place_is_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    path = tmp_path / "edit.json"
    files.write_json(str(path), {"run": 1})

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    message = one_line(files.write_json, str(path), {"run": 2}, names=path)
    assert "Read-only file system" in message
    assert json.loads(path.read_text()) == {"run": 1} and temporaries(tmp_path) == []


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
