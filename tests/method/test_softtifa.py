# Tests for GenEval 2 scored with Soft-TIFA (metrics.soft_tifa_*, eval.py --metrics soft-tifa; Kamath et al.,
# arXiv 2512.16853, github.com/facebookresearch/GenEval2): the AM / GM maths on hand-made probabilities, the
# answer spellings GenEval 2 counts, the benchmark file's one-line errors, the missing-file / missing-model
# skip lines, and the whole chain -- sample.py on a GenEval 2 file, eval.py scoring its images with a tiny
# VQA model whose output layer is set so that each answer gets a chosen probability.
import json
import math

import numpy as np
import pytest
import tiny_metric_models
import torch

import eval as ev
import files
import metrics
import sample

torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# The maths


def test_soft_tifa_am_gm_per_skill_and_atom_count_on_hand_made_probabilities():
    probs = [[1.0, 0.25], [0.5, 0.5, 0.5, 0.5], [0.9, 0.0, 0.6]]
    skills = [["object", "count"], ["object", "attribute", "position", "count"], ["object", "verb", "attribute"]]
    scores = metrics.soft_tifa_scores(probs, skills, atom_counts=[3, 3, 4])
    # per prompt, AM: 0.625, 0.5, 0.5; GM: sqrt(0.25) = 0.5, 0.5, and 0 (an atom at 0 sinks the prompt)
    expected = {
        "soft_tifa_am": (0.625 + 0.5 + 0.5) / 3,
        "soft_tifa_gm": (0.5 + 0.5 + 0.0) / 3,
        # atom level: every atom of a skill pooled over prompts, not a mean of per-prompt means
        "soft_tifa_am_object": (1.0 + 0.5 + 0.9) / 3,
        "soft_tifa_am_attribute": (0.5 + 0.6) / 2,
        "soft_tifa_am_count": (0.25 + 0.5) / 2,
        "soft_tifa_am_position": 0.5,
        "soft_tifa_am_verb": 0.0,
        # prompt level: the prompts' geometric means, averaged within an atom count
        "soft_tifa_gm_atoms3": (0.5 + 0.5) / 2,
        "soft_tifa_gm_atoms4": 0.0,
    }
    assert list(scores) == list(expected)  # no column for an atom count no prompt has
    assert all(math.isclose(scores[k], v, abs_tol=1e-12) for k, v in expected.items()), scores
    assert math.isclose(metrics.geometric_mean([0.5, 0.125]), 0.25)
    with pytest.raises(ValueError):
        metrics.soft_tifa_scores([[0.5, 0.5]], [["object"]], [3])


def test_answer_spellings_are_geneval2s():
    # evaluation.py's lists: "How many" answers as the word (both cases, with and without a space) and the digit
    assert set(metrics.answer_variants("How many cows are in the image?", "three")) == {
        "three",
        "Three",
        " three",
        " Three",
        "3",
        " 3",
    }
    assert set(metrics.answer_variants("Are the cows plastic?", "Yes")) == {"Yes", "yes", " yes", " Yes"}


# -----------------------------------------------------------------------------
# The benchmark file, and what is skipped


def geneval2_line(prompt, vqa_list, skills, atom_count):
    return json.dumps(dict(prompt=prompt, atom_count=atom_count, vqa_list=vqa_list, skills=skills)) + "\n"


def test_benchmark_file_errors_are_one_line(tmp_path):
    good = geneval2_line("a red circle", [["Is the circle red?", "Yes"]], ["attribute"], 2)
    cases = {
        "not JSON": "{oops\n",
        "not a GenEval 2 line": json.dumps({"prompt": "a red circle"}) + "\n",
        "one skill per pair": geneval2_line("a red circle", [["Is the circle red?", "Yes"]], [], 2),
        "unknown skill 'colour'": geneval2_line("a red circle", [["Is the circle red?", "Yes"]], ["colour"], 2),
    }
    for message, line in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(good + line)
        with pytest.raises(SystemExit) as e:
            metrics.read_geneval2(str(path))
        assert message in str(e.value) and "bad.jsonl:2" in str(e.value) and "\n" not in str(e.value)
    # sample.py reads the same file for its prompts
    (tmp_path / "good.jsonl").write_text(good)
    assert files.read_prompt_file(str(tmp_path / "good.jsonl")) == [{"prompt": "a red circle"}]


def test_missing_benchmark_or_model_is_skipped_with_one_line(tmp_path, capsys):
    benchmark = tmp_path / "geneval2_data.jsonl"
    benchmark.write_text(geneval2_line("a red circle", [["Is the circle red?", "Yes"]], ["attribute"], 2))
    (tmp_path / "empty").mkdir()
    cases = [
        (None, None, "no --geneval2 FILE"),
        (str(tmp_path / "absent.jsonl"), None, "no file"),
        (str(benchmark), None, "no --vqa-model DIR"),
        (str(benchmark), str(tmp_path / "absent"), "no folder"),
        (str(benchmark), str(tmp_path / "empty"), "cannot load"),
    ]
    for path, folder, why in cases:
        assert metrics.load_soft_tifa(path, folder) is None
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 and lines[0].startswith("soft-tifa: skipped (") and why in lines[0], lines


# -----------------------------------------------------------------------------
# sample.py -> eval.py on a tiny VQA model

BENCHMARK = [  # shapes-world prompts (what tiny-sd3 reads) in GenEval 2's format; no question asked twice
    (
        "a red circle",
        [["How many circles are in the image?", "one"], ["Is the circle red?", "Yes"]],
        ["count", "attribute"],
        3,
    ),
    (
        "two blue squares",
        [
            ["How many squares are in the image?", "two"],
            ["Are the squares blue?", "Yes"],
            ["Are there any squares in the image?", "Yes"],
        ],
        ["count", "attribute", "object"],
        3,
    ),
    (
        "a green triangle left of a red circle",
        [["Is the triangle green?", "Yes"], ["Is the triangle to the left of the circle?", "Yes"]],
        ["attribute", "position"],
        4,
    ),
]
CHOSEN = [[0.9, 0.4], [0.7, 0.2, 0.95], [0.05, 0.6]]  # the probability the tiny model gives each answer
SPELLINGS = {  # GenEval 2's evaluation.py, written out
    "one": ["one", "One", " one", " One", "1", " 1"],
    "two": ["two", "Two", " two", " Two", "2", " 2"],
    "Yes": ["Yes", "yes", " yes", " Yes"],
}


def set_answer_probabilities(folder, run):
    """Rewrite the tiny VQA model's output layer W so that, on each image of `run` and each of its questions,
    the softmax puts probability CHOSEN on the first tokens of the correct answer's spellings: logits a on
    those k tokens and 0 on the other V - k give k e^a / (k e^a + V - k) = p. W h_i = logits_i for the
    last hidden states h_i (fewer than their width, so independent): W = L H^+."""
    items, (model, processor) = metrics.load_soft_tifa(str(run / "geneval2.jsonl"), str(folder))
    records = {r["prompt"]: r for r in ev.read_records(str(run))}
    head, seen = model.get_output_embeddings(), []
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0, -1].double()))
    vocab = head.weight.shape[0]
    targets = []
    with torch.no_grad():
        for (prompt, vqa_list, _, _), chosen in zip(BENCHMARK, CHOSEN):
            image = metrics.load_image(str(run / records[prompt]["image"]))
            for (question, answer), p in zip(vqa_list, chosen):
                model(**metrics.vqa_inputs((model, processor), image, question))
                first = {processor.tokenizer(s, add_special_tokens=False).input_ids[0] for s in SPELLINGS[answer]}
                logits = torch.zeros(vocab, dtype=torch.float64)
                logits[sorted(first)] = math.log(p * (vocab - len(first)) / (len(first) * (1 - p)))
                targets.append(logits)
    hook.remove()
    hidden = torch.stack(seen)  # (N, width)
    head.weight.data = (torch.linalg.pinv(hidden) @ torch.stack(targets)).T.float().contiguous()
    model.save_pretrained(folder)


def test_soft_tifa_of_sampled_images_through_eval(tmp_path, capsys):
    run, vqa = tmp_path / "sd3-geneval2", tmp_path / "tiny-vqa"
    benchmark = tmp_path / "geneval2.jsonl"
    benchmark.write_text("".join(geneval2_line(*item) for item in BENCHMARK))
    sample.main(
        ["--model", "tiny-sd3", "--random-init", "--steps", "2", "--size", "16", "--prompts", str(benchmark)]
        + ["--out", str(run)]
    )
    (run / "geneval2.jsonl").write_text(benchmark.read_text())
    tiny_metric_models.save_vqa(vqa)
    set_answer_probabilities(vqa, run)
    capsys.readouterr()

    argv = ["--runs", str(run), "--metrics", "soft-tifa", "--geneval2", str(benchmark), "--vqa-model", str(vqa)]
    groups = ev.main(argv)
    got = {k: m["mean"] for k, m in groups["sd3-geneval2[plain]"]["metrics"].items()}
    gm = [float(np.prod(p)) ** (1 / len(p)) for p in CHOSEN]
    expected = {
        "soft_tifa_am": np.mean([np.mean(p) for p in CHOSEN]),
        "soft_tifa_gm": np.mean(gm),
        "soft_tifa_am_object": 0.95,
        "soft_tifa_am_attribute": (0.4 + 0.2 + 0.05) / 3,
        "soft_tifa_am_count": (0.9 + 0.7) / 2,
        "soft_tifa_am_position": 0.6,
        "soft_tifa_gm_atoms3": (gm[0] + gm[1]) / 2,
        "soft_tifa_gm_atoms4": gm[2],
    }
    assert set(got) == set(expected)
    assert all(abs(got[k] - v) < 1e-4 for k, v in expected.items()), (got, expected)
    assert "soft_tifa_am x100" in capsys.readouterr().out  # printed x100, as GenEval 2 does

    # a benchmark prompt the run has no image for: a one-line error, not a score over part of the benchmark
    more = tmp_path / "geneval2-more.jsonl"
    more.write_text(benchmark.read_text() + geneval2_line("three yellow triangles", [["Q?", "Yes"]], ["verb"], 3))
    with pytest.raises(SystemExit) as e:
        ev.main(["--runs", str(run), "--metrics", "soft-tifa", "--geneval2", str(more), "--vqa-model", str(vqa)])
    assert "no image for 1 of the 4 GenEval 2 prompts" in str(e.value)
