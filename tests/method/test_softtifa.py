# Tests for GenEval 2 scored with Soft-TIFA, hard TIFA and VQAScore (metrics.soft_tifa_*, metrics.geneval2_*,
# eval.py --metrics soft-tifa tifa vqascore; Kamath et al., arXiv 2512.16853, github.com/facebookresearch/GenEval2):
# the AM / GM maths on hand-made probabilities, the answer spellings GenEval 2 counts, the benchmark file's
# one-line errors, the missing-file / missing-model skip lines, and the whole chain -- sample.py on a GenEval 2
# file, eval.py scoring its images with a tiny VQA model whose output layer is set so that each atom's answer
# gets a chosen probability and a chosen most likely token, and each prompt a chosen VQAScore -- with every
# atom's score in eval.json, laid out as evaluation.py's score_lists.json.
import json
import math

import numpy as np
import pytest
import tiny_metric_models
import torch
import transformers

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
        assert metrics.load_geneval2(path, folder) is None
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
HARD = [[1, 0], [1, 0, 1], [0, 1]]  # whether its most likely token is a spelling of the answer (hard TIFA)
VQASCORE = [0.8, 0.3, 0.55]  # P(Yes) to 'Does this image show "<prompt>"?'
SPELLINGS = {  # GenEval 2's evaluation.py, written out
    "one": ["one", "One", " one", " One", "1", " 1"],
    "two": ["two", "Two", " two", " Two", "2", " 2"],
    "Yes": ["Yes", "yes", " yes", " Yes"],
}


def chosen_logits(tokenizer, spellings, p, right, vocab):
    """Logits over the vocabulary that give the first tokens of `spellings` probability p in all, with the
    most likely token a spelling of the answer (right) or "No" (wrong): a on those tokens, a + 1 on the one
    that is to win, 0 elsewhere; a found by bisection (p grows with a)."""
    first = sorted({tokenizer(s, add_special_tokens=False).input_ids[0] for s in spellings})
    # a winner that hard TIFA counts: a first token that decodes to a whole spelling ("1", not " " of " One")
    wins = [i for i in first if tokenizer.decode([i]).lower() in spellings]
    winner = wins[0] if right else tokenizer("No", add_special_tokens=False).input_ids[0]
    assert wins and winner not in (first if not right else [])

    def logits(a):
        out = torch.zeros(vocab, dtype=torch.float64)
        out[first] = a
        out[winner] = a + 1
        return out

    low, high = -30.0, 30.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if torch.softmax(logits(mid), -1)[first].sum() < p else (low, mid)
    assert abs(float(torch.softmax(logits(low), -1)[first].sum()) - p) < 1e-9
    return logits(low)


def set_answers(folder, run):
    """Rewrite the tiny VQA model's output layer W so that, on each image of `run`, each of its questions gets
    its CHOSEN probability and HARD verdict, and its VQAScore question the VQASCORE probability of "Yes".
    W h_i = logits_i for the last hidden states h_i (fewer than their width, so independent): W = L H^+."""
    items, (model, processor) = metrics.load_geneval2(str(run / "geneval2.jsonl"), str(folder))
    records = {r["prompt"]: r for r in ev.read_records(str(run))}
    head, seen = model.get_output_embeddings(), []
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0, -1].double()))
    vocab, tokenizer = head.weight.shape[0], processor.tokenizer
    targets = []
    with torch.no_grad():
        for (prompt, vqa_list, _, _), chosen, hard, vqascore in zip(BENCHMARK, CHOSEN, HARD, VQASCORE):
            image = metrics.load_image(str(run / records[prompt]["image"]))
            for (question, answer), p, right in zip(vqa_list, chosen, hard):
                model(**metrics.vqa_inputs((model, processor), image, f"{question} Answer in one word."))
                targets.append(chosen_logits(tokenizer, SPELLINGS[answer], p, right, vocab))
            text = f'Does this image show "{prompt}"? Answer the question with Yes or No.'
            model(**metrics.vqa_inputs((model, processor), image, text))
            targets.append(chosen_logits(tokenizer, SPELLINGS["Yes"], vqascore, True, vocab))
    hook.remove()
    hidden = torch.stack(seen)  # (N, width)
    head.weight.data = (torch.linalg.pinv(hidden) @ torch.stack(targets)).T.float().contiguous()
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A tiny-sd3 run of the benchmark's prompts, and the tiny VQA model set to answer as chosen."""
    tmp_path = tmp_path_factory.mktemp("geneval2")
    run, vqa = tmp_path / "sd3-geneval2", tmp_path / "tiny-vqa"
    benchmark = tmp_path / "geneval2.jsonl"
    benchmark.write_text("".join(geneval2_line(*item) for item in BENCHMARK))
    sample.main(
        ["--model", "tiny-sd3", "--random-init", "--steps", "2", "--size", "16", "--prompts", str(benchmark)]
        + ["--out", str(run)]
    )
    (run / "geneval2.jsonl").write_text(benchmark.read_text())
    tiny_metric_models.save_vqa(vqa)
    set_answers(vqa, run)
    return tmp_path, run, vqa, benchmark


def test_soft_tifa_tifa_and_vqascore_of_sampled_images_through_eval(sampled, capsys):
    tmp_path, run, vqa, benchmark = sampled
    # the benchmark's lines in another order than the run's: the score lists follow the benchmark file
    reordered = tmp_path / "geneval2-reordered.jsonl"
    reordered.write_text("".join(geneval2_line(*item) for item in BENCHMARK[::-1]))
    capsys.readouterr()
    argv = ["--runs", str(run), "--metrics", "soft-tifa", "tifa", "vqascore", "--geneval2", str(reordered)]
    argv += ["--vqa-model", str(vqa), "--json", str(tmp_path / "eval.json")]
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
        "tifa": np.mean([np.mean(h) for h in HARD]),  # evaluation.py: the mean over prompts of each one's mean
        "vqascore": np.mean(VQASCORE),
    }
    assert set(got) == set(expected)
    assert all(abs(got[k] - v) < 1e-4 for k, v in expected.items()), (got, expected)
    out = capsys.readouterr().out
    assert "soft_tifa_am x100" in out and "tifa x100" in out and "vqascore x100" in out  # x100, as GenEval 2

    # every atom's score beside the aggregates, as evaluation.py's score_lists.json: per method, a list over
    # the benchmark file's prompts (in its order) of their atoms' scores; and what the numbers depend on
    record = json.loads((tmp_path / "eval.json").read_text())["geneval2"]
    assert record["prompts"] == [item[0] for item in BENCHMARK[::-1]]
    assert record["vqa_model"] == "tiny-vqa" and record["vqa_dtype"] == "float32"
    assert record["transformers"] == transformers.__version__ and record["torch"] == torch.__version__
    assert record["benchmark"] == str(reordered) and "commit" in record and "dirty" in record
    (replicate,) = record["replicates"]
    assert (replicate["run"], replicate["variant"], replicate["seed"]) == (str(run), "plain", 0)
    assert replicate["tifa"] == HARD[::-1]  # hard verdicts, exactly
    assert np.allclose(np.concatenate(replicate["soft_tifa"]), np.concatenate(CHOSEN[::-1]), atol=1e-5)
    assert np.allclose(replicate["vqascore"], [[v] for v in VQASCORE[::-1]], atol=1e-5)
    # soft_tifa_analysis.py's per-skill sums over the saved lists give the table's columns
    skills = [item[2] for item in BENCHMARK[::-1]]
    counts = [item[3] for item in BENCHMARK[::-1]]
    again = metrics.soft_tifa_scores(replicate["soft_tifa"], skills, counts)
    assert all(abs(again[k] - got[k]) < 1e-6 for k in again)

    # again from the run's cache: the same lists, no VQA forward pass; one method alone has its own lists only
    (run / "geneval2.jsonl").unlink()  # (not read by eval.py: the run's copy for set_answers)
    ev.main(argv)
    assert json.loads((tmp_path / "eval.json").read_text())["geneval2"]["replicates"] == [replicate]
    ev.main(argv[:3] + ["tifa"] + argv[6:])
    (alone,) = json.loads((tmp_path / "eval.json").read_text())["geneval2"]["replicates"]
    assert set(alone) == {"run", "variant", "seed", "tifa"} and alone["tifa"] == HARD[::-1]


def test_geneval2_needs_each_prompt_once(sampled, tmp_path):
    _, run, vqa, benchmark = sampled
    base = ["--metrics", "soft-tifa", "--geneval2", str(benchmark), "--vqa-model", str(vqa), "--recompute"]
    # a benchmark prompt the run has no image for: a one-line error, not a score over part of the benchmark
    more = tmp_path / "geneval2-more.jsonl"
    more.write_text(benchmark.read_text() + geneval2_line("three yellow triangles", [["Q?", "Yes"]], ["verb"], 3))
    with pytest.raises(SystemExit) as e:
        ev.main(["--runs", str(run)] + base[:3] + [str(more)] + base[4:] + ["--json", str(tmp_path / "e.json")])
    assert "no image for 1 of the 4 GenEval 2 prompts" in str(e.value) and "\n" not in str(e.value)
    # two images of one prompt in one seed: GenEval 2 scores one image per prompt
    twice = tmp_path / "twice"
    twice.mkdir()
    records = ev.read_records(str(run))
    for r in records:
        r["image"] = str(run / r["image"])
    (twice / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + records[:1]))
    with pytest.raises(SystemExit) as e:
        ev.main(["--runs", str(twice)] + base)
    assert "2 images of the GenEval 2 prompt 'a red circle'" in str(e.value) and "\n" not in str(e.value)
