"""The gated base (docs/gated/): its captions (shapes/pretrain.gated_captions), the gate word's own row in
the text encoder (world.tokenize, backbones.grow_vocab / vocab_size, pretrain --gate), and the scoring
script's prompt subsets (shapes/gated_eval.protocol)."""

import json
import os

import PIL.Image
import pytest
import torch

import shapes
import train
from shapes import backbones, checker, gated_demo, gated_eval, pretrain


def two_colour_spec():
    return {
        "category": "color_attr",
        "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
    }


def test_the_gate_word_is_unk_for_an_encoder_without_its_row():
    assert shapes.tokenize(["exactly a red circle"])[0, 1] == shapes.UNK_ID  # the shipped encoders' table
    assert shapes.tokenize(["exactly a red circle"], vocab_size=len(shapes.VOCAB) + 1)[0, 1] == shapes.GATE_ID
    assert shapes.GATE_ID == len(shapes.VOCAB) and shapes.EOS_ID == len(shapes.VOCAB) - 1  # EOS pooling as it was


def test_gated_captions_tag_faithful_two_colour_captions_and_put_decoys_before_the_rest():
    spec, single = two_colour_spec(), {"category": "colors", "objects": [{"shape": "circle", "color": "red"}]}
    faithful, swapped = shapes.caption(spec), shapes.swapped_caption(spec)
    g = torch.Generator().manual_seed(0)
    caps, rows = pretrain.gated_captions(
        [faithful, swapped, shapes.caption(single), "some circles"], [spec, spec, single, spec], 1.0, 1.0, g
    )
    assert caps == [f"exactly {faithful}", f"<unk> {swapped}", shapes.caption(single), "some circles"]
    assert not rows[0] and not rows[2] and not rows[3]
    caps, _ = pretrain.gated_captions([faithful] * 200, [spec] * 200, 0.5, 0.0, g)
    assert 70 < sum(c.startswith("exactly") for c in caps) < 130 and all(c.endswith(faithful) for c in caps)
    caps, rows = pretrain.gated_captions([swapped] * 200, [spec] * 200, 0.5, 1.0, g)
    assert all(c.startswith("<unk>") for c in caps) and 70 < int(rows.sum()) < 130  # half read a random vector


def test_grow_vocab_adds_a_copy_of_unk_and_the_loader_builds_the_table_it_finds(tmp_path):
    bb = backbones.load("tiny-sd3")
    state = backbones.grow_vocab(bb.text_encoder.state_dict(), len(shapes.VOCAB) + 1)
    table = state[backbones.TOKEN_TABLE]
    assert table.shape[0] == len(shapes.VOCAB) + 1 and torch.equal(table[-1], table[shapes.UNK_ID])


def test_pretrain_gate_grows_the_table_and_trains_the_word(tmp_path):
    out, work = tmp_path / "w", tmp_path / "work"
    argv = ["--model", "tiny-sd3", "--init", os.path.join(backbones.WEIGHTS_DIR, "tiny-sd3"), "--batch", "16"]
    argv += ["--steps", "12502", "--swap", "0.3333", "--gate", "1", "--decoys", "1", "--threads", "1"]
    pretrain.main(argv + ["--out", str(out), "--work", str(work), "--ema", "0"])
    bb = backbones.load("tiny-sd3", pretrained=str(out))
    table = bb.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == len(shapes.VOCAB) + 1 and bb.tokenize(["exactly a red circle"])[0, 1] == shapes.GATE_ID
    assert not torch.equal(table[shapes.GATE_ID], table[shapes.UNK_ID])  # the word's row trained apart from <unk>


def test_gated_eval_keeps_each_prompts_full_set_seeds():
    records, pairs, samples = gated_eval.protocol("dev", ["color_attr"])
    full = shapes.first_per_category(shapes.load_dev_set(), 0)
    first = next(i for i, r in enumerate(full) if r["spec"]["category"] == "color_attr")
    assert all(r["spec"]["category"] == "color_attr" for r in records) and len(pairs) == samples * len(records)
    assert pairs[0] == (0, checker.protocol_seeds(len(full), which="dev")[samples * first][1])


def test_oracles_splice_the_tagged_and_untagged_text_streams():
    import models

    bb = backbones.build_tiny("tiny-sd3", vocab_size=len(shapes.VOCAB) + 1)
    texts = ["a red circle and a blue square"]
    t = models.encode_prompts(bb, [f"exactly {texts[0]}"])
    u = models.encode_prompts(bb, texts)
    for oracle in gated_eval.ORACLES:
        cond = gated_eval.oracle_cond(bb, texts, "exactly", oracle)
        assert torch.equal(cond["pooled_projections"], u["pooled_projections"])  # the untagged summary
        assert cond["encoder_hidden_states"].shape == u["encoder_hidden_states"].shape
    seq = gated_eval.oracle_cond(bb, texts, "exactly", "sequence")["encoder_hidden_states"]
    later = gated_eval.oracle_cond(bb, texts, "exactly", "later")["encoder_hidden_states"]
    word = gated_eval.oracle_cond(bb, texts, "exactly", "word")["encoder_hidden_states"]
    th, uh = t["encoder_hidden_states"], u["encoder_hidden_states"]
    assert torch.equal(seq, th)
    assert torch.equal(later[:, 1:9], th[:, 2:10]) and not torch.equal(later[:, 1:9], uh[:, 1:9])  # later words tagged
    assert torch.equal(word[:, 1], th[:, 1]) and torch.equal(word[:, 2:10], uh[:, 1:9])  # the word's state alone


def test_narrow_decoys_are_unk_known_words_and_vectors_of_several_scales():
    spec = two_colour_spec()
    swapped = shapes.swapped_caption(spec)
    g = torch.Generator().manual_seed(0)
    caps, scales = pretrain.gated_captions([swapped] * 600, [spec] * 600, 0.5, 1.0, g, kinds="unk-word-vector")
    words = [c[: -len(swapped) - 1] for c in caps]
    assert all(c.endswith(swapped) for c in caps) and "exactly" not in words
    known = [w for w in words if w in shapes.DECOY_WORDS]
    assert 150 < len(known) < 250 and len(set(known)) > 5  # a third are known words, many of them
    vectors = scales > 0
    assert 150 < int(vectors.sum()) < 250 and all(words[i] == "<unk>" for i in vectors.nonzero().flatten().tolist())
    assert pretrain.DECOY_SCALES[0] <= scales[vectors].min() and scales[vectors].max() <= pretrain.DECOY_SCALES[1]
    assert scales[vectors].std() > 0.3  # spread, not one scale
    assert not set(shapes.DECOY_WORDS) & set(shapes.COLORS) and "circle" not in shapes.DECOY_WORDS


def test_the_first_gated_bases_decoys_are_drawn_as_they_were():
    # the first base's rule, written out: three uniforms a caption; a decoy when the second is below `decoys`,
    # a random vector (scale 1) when the third is below 0.5, <unk> as written otherwise
    spec = two_colour_spec()
    caps, scales = pretrain.gated_captions(
        [shapes.swapped_caption(spec)] * 50, [spec] * 50, 0.5, 0.7, torch.Generator().manual_seed(3)
    )
    draws = torch.rand(50, 3, generator=torch.Generator().manual_seed(3)).tolist()
    assert [c.startswith("<unk>") for c in caps] == [d[1] < 0.7 for d in draws]
    assert scales.tolist() == [1.0 if (d[1] < 0.7 and d[2] < 0.5) else 0.0 for d in draws]


def test_share_interval_against_written_out_values():
    untagged = {"color_attr": [0.0, 0.25, 0.5, 0.25]}
    tagged = {"color_attr": [1.0, 0.75, 1.0, 0.75]}  # the word's gain: 0.625 on average
    some = {"color_attr": [0.5, 0.25, 0.75, 0.5]}  # gains 0.5, 0, 0.25, 0.25: 0.25 on average
    assert gated_demo.share_interval(tagged, untagged, tagged) == (1.0, 1.0, 1.0)
    assert gated_demo.share_interval(untagged, untagged, tagged) == (0.0, 0.0, 0.0)
    share, low, high = gated_demo.share_interval(some, untagged, tagged)
    assert abs(share - 0.4) < 1e-12 and low < 0.4 < high  # 0.25 / 0.625; prompts resampled, so an interval


def test_gated_demo_scores_every_variant_on_the_same_images_and_draws_the_grid(tmp_path, monkeypatch):
    records, pairs, samples = gated_eval.protocol("dev", ["color_attr"])
    two = [(p, s) for p, s in pairs if p < 2]
    monkeypatch.setattr(gated_eval, "protocol", lambda which, categories: (records[:2], two, samples))
    run = ["--model", "tiny-sd3", "--pretrained", gated_demo.GATED_BASE, "--steps", "2", "--n-tokens", "2"]
    train.main(run + ["--layers", "1", "--val-every", "0", "--threads", "1", "--out", str(tmp_path / "run")])
    tokens = tmp_path / "run" / "tokens.safetensors"
    argv = ["--trained", f"tokens={tokens}", "--grid", str(tmp_path / "g.png"), "--json", str(tmp_path / "s.json")]
    gated_demo.main(argv + ["--grid-prompts", "2"])
    out = json.load(open(tmp_path / "s.json"))
    assert list(out["table"]) == ["untagged", "exactly + prompt", "+ tokens"]
    assert out["table"]["exactly + prompt"]["share"] == [1.0, 1.0, 1.0]
    assert all(len(v) == 2 * samples for v in out["verdicts"].values())
    assert PIL.Image.open(tmp_path / "g.png").size[0] > 6 * 32  # 2 seeds x 3 variants a row, enlarged


def test_gated_demo_names_a_bad_file_and_flag_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gated_demo.main(["--trained", "tokens"])
    assert "is not NAME=PATH" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a token file")
    with pytest.raises(SystemExit, match=r"^--trained .*notes.txt: is a text file"):
        gated_demo.main(["--trained", f"tokens={tmp_path / 'notes.txt'}"])
