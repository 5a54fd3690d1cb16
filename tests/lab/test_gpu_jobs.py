"""gpu_jobs.py --set speed (issue #39): the one GPU command for the real-size speed measurements runs end to
end on the CPU at tiny sizes -- every job's shapes/bench.py command, one table, its files -- and a job in its
own child process gives its rows, or one row saying it was stopped at its budget."""

import json

import pytest
import torch

from shapes import bench, gpu_jobs

torch.set_num_threads(1)

JOBS = [job["name"] for job in gpu_jobs.SPEED_JOBS]


def in_this_process(cmd, log, budget):
    """gpu_jobs.run_child without the child: each job's command, `python -m shapes.bench ARGS`, as bench.main(ARGS)
    (the suite cannot pay six interpreters' imports; the child itself is checked in the next test)."""
    assert cmd[1:3] == ["-m", "shapes.bench"]
    bench.main(cmd[3:])
    return 0


def test_speed_set_runs_end_to_end_on_the_cpu(tmp_path, capsys, monkeypatch):
    out = tmp_path / "speed"
    monkeypatch.setattr(gpu_jobs, "run_child", in_this_process)
    rows = gpu_jobs.main(["--set", "speed", "--rounds", "1", "--peak-tflops", "1", "--out", str(out)])
    by_job = {}
    for row in rows:
        by_job.setdefault(row["job"].split(" ")[0], []).append(row)
    assert list(by_job) == JOBS  # every job, in order, each at its tiny size
    assert all("(tiny: " in row["job"] for row in rows)
    for job in gpu_jobs.SPEED_JOBS:
        mine = by_job[job["name"]]
        if job["kind"] == "train":
            softrepa, agsm = mine
            assert (softrepa["measure"], agsm["measure"]) == ("softrepa", "agsm")
            assert softrepa["batch"] == agsm["batch"] == "2 (4 pairs)"  # TINY's batch
            # the job's --rows-per-forward (FLUX's recommended 1; SDXL's 2), at most the batch
            assert softrepa["rows_per_forward"] == min(job["rows"] or 2, 2)
            for row in mine:
                assert row["seconds"] > 0 and row["tflop"] > 0
                assert row["mfu"] == pytest.approx(row["tflop"] / row["seconds"])  # against --peak-tflops 1
            # counted FLOPs: AGSM is SoftREPA plus one no-grad forward of the same pairs (~3F against ~2F)
            assert 1.3 < agsm["tflop"] / softrepa["tflop"] < 1.7
        elif job["kind"] == "sample":
            plain, tokens = mine
            assert plain["measure"] == "sampler, 4 steps, cfg 4" and tokens["measure"] == "sampler with tokens"
            assert plain["seconds"] > 0 and tokens["seconds"] > 0 and tokens["peak_gib"] > plain["peak_gib"] > 0
            assert "latency" in tokens["note"] and "memory" in tokens["note"]
        else:
            plain, ddp = mine
            assert ddp["measure"] == "softrepa step, 1-rank gloo DDP" and plain["seconds"] > 0 and ddp["seconds"] > 0
            assert "ddp / plain" in ddp["note"]
    # one table, printed and written, and the rows with where they come from
    table = (out / "speed.md").read_text()
    assert table.splitlines()[0].startswith("`python -m shapes.gpu_jobs --set speed --tiny` on CPU (peak 1 TFLOP/s")
    assert table.count("\n| ") == len(rows) + 1 and table.splitlines()[2].startswith("| job | measure |")
    assert table.strip().split("\n\n")[1] in capsys.readouterr().out
    saved = json.loads((out / "speed.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and "commit" in saved and set(saved["results"]) == set(JOBS)
    assert all(r["device_name"] == "CPU" and r["precision"] == "bf16" for r in saved["results"].values())


def test_a_job_in_its_child_process_and_one_stopped_at_its_budget(tmp_path, monkeypatch):
    out = tmp_path / "speed"
    argv = ["--set", "speed", "--rounds", "1", "--out", str(out), "--only", "ddp-sd3-512"]
    (plain, ddp) = gpu_jobs.main(argv)
    assert ddp["measure"] == "softrepa step, 1-rank gloo DDP" and ddp["seconds"] > 0
    assert (out / "logs" / "ddp-sd3-512.log").exists()
    # a job that outlives its budget is killed; its row says so, and the table still comes out
    job = next(j for j in gpu_jobs.SPEED_JOBS if j["name"] == "ddp-sd3-512")
    monkeypatch.setitem(job, "budget", 0.2)
    (row,) = gpu_jobs.main(argv)
    assert row["note"].startswith("stopped at its budget of 0 s") and "ddp-sd3-512" in (out / "speed.md").read_text()
    # and a set whose deadline has passed runs nothing
    rows = gpu_jobs.main(argv[:-2] + ["--deadline", "1"])
    assert [row["note"] for row in rows] == ["not run: the deadline had passed"] * len(JOBS)
