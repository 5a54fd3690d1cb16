"""The lab's outputs go through files.write, tried on a real small filesystem that fills up (conftest's
small_disk; skipped, saying why, where it cannot be mounted): a world preview and prompt set, a report's markdown,
the sweep's CSV, gpu_jobs' packed results and the counter's weights. Each: one line naming the file and the full
disk, exit non-zero, the last good file as it was, no temporary file left."""

import os

import disks
import pytest
import torch

import files
from shapes import checker, counter, gpu_jobs, report, world

torch.set_num_threads(1)


def temporaries(folder):
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def refused(fn, *args, names):
    """fn(*args) ends in SystemExit with one line (exit status 1) saying the disk is full and naming `names`."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message  # a string: Python exits with status 1
    assert str(names) in message and "the disk is full" in message, message
    return message


def after_a_full_disk(path, fn, *args):
    """Fill the disk of `path` (holding a good file), run fn(*args): one line, `path` unchanged, no temporary."""
    before = open(path, "rb").read()
    disks.fill(os.path.dirname(path))
    refused(fn, *args, names=path)
    assert open(path, "rb").read() == before and temporaries(os.path.dirname(path)) == []


def test_world_preview_and_prompt_set(small_disk):
    folder = small_disk(512)
    preview, dev = str(folder / "preview.png"), str(folder / "dev.jsonl")
    world.main(["--preview", preview, "--write-dev", dev])
    before = open(dev, "rb").read()
    after_a_full_disk(preview, world.main, ["--preview", preview, "--seed", "1"])
    refused(world.main, ["--write-dev", dev], names=dev)
    assert open(dev, "rb").read() == before and temporaries(folder) == []


def test_report_markdown_and_the_sweep_csv(small_disk):
    folder = small_disk(256)
    sweep_csv, markdown = str(folder / "sweep.csv"), str(folder / "report.md")
    rows = [{"run": "base", "mean": 0.7, "mean_low": 0.66, "mean_high": 0.74, "overcount_counting": 0.2}]
    files.write_csv(sweep_csv, report.SWEEP_COLUMNS, rows)  # sweep.py's writer
    report.main(["--sweep", sweep_csv, "--markdown", markdown])
    after_a_full_disk(markdown, report.main, ["--sweep", sweep_csv, "--sweep", sweep_csv, "--markdown", markdown])
    refused(files.write_csv, sweep_csv, report.SWEEP_COLUMNS, rows * 10**4, names=sweep_csv)
    assert report.sweep_table(sweep_csv)  # the last good table, whole
    assert "0.7" in open(sweep_csv).read() and temporaries(folder) == []


def test_a_csv_that_is_no_sweep_is_one_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n1,0.5\n")
    with pytest.raises(SystemExit) as e:
        report.sweep_table(str(path))
    assert "has no column run, mean," in e.value.code and "expected a sweep.csv" in e.value.code


def test_gpu_jobs_packed_results(small_disk, tmp_path, monkeypatch):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    for folder in (runs, logs):
        folder.mkdir()
    (runs / "log.csv").write_bytes(os.urandom(100_000))  # incompressible: the archive is as large
    monkeypatch.setattr(gpu_jobs, "RUNS", str(runs))
    packed = small_disk(256)
    (part,) = gpu_jobs.pack(str(packed), str(logs))
    (runs / "log.csv").write_bytes(os.urandom(150_000))
    after_a_full_disk(part, gpu_jobs.pack, str(packed), str(logs))


def test_counter_weights(small_disk):
    path = str(small_disk(4096) / "counter.safetensors")
    with open(checker.COUNTER_WEIGHTS, "rb") as f:
        shipped = f.read()
    with open(path, "wb") as f:
        f.write(shipped)
    after_a_full_disk(path, counter.main, ["--steps", "1", "--n-train", "64", "--out", path])
    assert checker.load_counter(path) is not None  # the last good weights, whole
