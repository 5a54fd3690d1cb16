"""benchmarks.py: the editing benchmarks read from tiny fake folders laid out as released (PIE-Bench,
DIV2K with SoftREPA's prompts_editing.json, Cat2Dog as AFHQ's cat folders), then edit.py --bench over
them with and without tokens, and eval.py --bench on the two folders of edits."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks
import edit
import eval as ev
import shapes
import softtokens

RED = {"category": "single_object", "objects": [{"shape": "circle", "color": "red"}]}


def save(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(shapes.render(RED, 64, seed)).save(path)


def div2k(root):
    """SoftREPA's samples/prompts_editing.json layout; the images in DIV2K_train_HR/."""
    for name in ("0001.png", "0002.png"):
        save(root / "DIV2K_train_HR" / name)
    (root / "prompts_editing.json").write_text(
        json.dumps(
            [
                {"prompt": "a red circle\n", "img_path": "0001.png", "tgt_prompt": "a blue circle\n"},
                {"prompt": "a red circle\n", "img_path": "0002.png", "tgt_prompt": "a red square\n"},
            ]
        )
    )
    return str(root)


def cat2dog(root, prompts=False):
    for i in range(2):
        save(root / "val" / "cat" / f"flickr_cat_{i:06d}.jpg", i)
    if prompts:
        (root / "prompts_editing.json").write_text(
            json.dumps(
                [
                    {
                        "prompt": "a red circle",
                        "img_path": "val/cat/flickr_cat_000000.jpg",
                        "tgt_prompt": "a blue circle",
                    }
                ]
            )
        )
    return str(root)


def pie(root):
    save(root / "annotation_images" / "1_change" / "a.jpg")
    (root / "mapping_file.json").write_text(
        json.dumps(
            {
                "000": dict(
                    image_path="1_change/a.jpg",
                    original_prompt="a [red] circle",
                    editing_prompt="a [blue] circle",
                    editing_type_id="1",
                    mask=[0, 512 * 512],
                )
            }
        )
    )
    return str(root)


def test_each_layout_reads_into_the_same_records(tmp_path):
    records = benchmarks.read(div2k(tmp_path / "div2k"))
    assert [(r["name"], r["src"], r["tgt"], r["mask"]) for r in records] == [
        ("0001.png", "a red circle", "a blue circle", None),
        ("0002.png", "a red circle", "a red square", None),
    ]
    assert records[0]["image"].endswith(os.path.join("DIV2K_train_HR", "0001.png"))
    cats = benchmarks.read(cat2dog(tmp_path / "c2d"))
    assert [(r["name"], r["src"], r["tgt"]) for r in cats] == [
        (os.path.join("val", "cat", f"flickr_cat_{i:06d}.jpg"), "a photo of a cat", "a photo of a dog")
        for i in range(2)
    ]
    with_prompts = benchmarks.read(cat2dog(tmp_path / "c2d-prompts", prompts=True))
    assert (with_prompts[0]["tgt"], with_prompts[1]["tgt"]) == ("a blue circle", "a photo of a dog")
    (item,) = benchmarks.read(pie(tmp_path / "pie"))
    assert (item["src"], item["tgt"], item["name"]) == ("a red circle", "a blue circle", "1_change/a.jpg")


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="is an empty folder; expected an editing benchmark folder"):
        benchmarks.read(str(tmp_path))
    (tmp_path / "prompts_editing.json").write_text(json.dumps({"img_path": "x"}))
    with pytest.raises(SystemExit, match="expected a non-empty JSON list of entries"):
        benchmarks.read(str(tmp_path))
    (tmp_path / "prompts_editing.json").write_text(
        json.dumps([{"img_path": "9.png", "prompt": "a", "tgt_prompt": "b"}])
    )
    with pytest.raises(SystemExit, match="names 9.png, which is neither"):
        benchmarks.read(str(tmp_path))


def test_edit_a_benchmark_with_and_without_tokens_then_its_metrics(tmp_path, tiny_sd3, tiny_clip_dir, monkeypatch):
    import models

    monkeypatch.setattr(models, "from_flags", lambda args, *a, **k: tiny_sd3)  # random-weight tiny-sd3, built once
    tokens = softtokens.make_tokens(tiny_sd3, "softrepa")
    torch.manual_seed(0)
    with torch.no_grad():
        tokens.tokens.normal_(0, 3.0)
    softtokens.save(str(tmp_path / "t.safetensors"), tokens, model="tiny-sd3")
    bench, out = div2k(tmp_path / "div2k"), tmp_path / "edits"
    record = edit.main(
        [
            "--model",
            "tiny-sd3",
            "--bench",
            bench,
            "--tokens",
            str(tmp_path / "t.safetensors"),
            "--steps",
            "4",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert record["edits"] == 2
    for name in ("0001.png", "0002.png"):
        plain, tuned = (np.asarray(Image.open(out / v / name)) for v in ("plain", "tokens"))
        assert plain.shape == (32, 32, 3) and np.abs(plain.astype(int) - tuned).max() > 0
    one = edit.main(
        ["--model", "tiny-sd3", "--bench", bench, "--limit", "1", "--steps", "4", "--out", str(tmp_path / "one")]
    )
    assert one["edits"] == 1 and not os.path.exists(tmp_path / "one" / "tokens")
    weights = tmp_path / "weights"
    shutil.copytree(tiny_clip_dir, weights / "clip-vit-large-patch14")
    groups = ev.main(
        [
            "--runs",
            str(out / "plain"),
            str(out / "tokens"),
            "--metrics",
            "edit",
            "clip",
            "--bench",
            bench,
            "--weights",
            str(weights),
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    for variant in ("plain", "tokens"):
        values = groups[variant]["metrics"]
        assert 0 <= values["clip_whole"]["mean"] <= 100 and "bg_psnr" not in values  # no mask: whole-image metrics


def test_whole_image_metrics_without_a_mask(tmp_path, tiny_clip_dir):
    """DIV2K / Cat2Dog edits have no mask: CLIP on the whole edit only (no edited-region CLIP, no background
    PSNR / SSIM); an edit at the model's size is compared with its source at that size."""
    import metrics

    src = tmp_path / "src.png"
    save(src)
    small = tmp_path / "edit.png"
    Image.open(src).resize((32, 32)).save(small)
    clip = metrics.load_clip("clip", "tiny-clip", weights=str(tiny_clip_dir.parent))
    values = benchmarks.edit_metrics([("k", str(src), str(small), None, "a red circle")], clip=clip)
    assert set(values) == {"clip_whole"} and 0 <= values["clip_whole"] <= 100
    masked = benchmarks.edit_metrics([("k", str(src), str(small), np.ones((512, 512)), "a red circle")], clip=clip)
    assert set(masked) == {"clip_whole", "clip_edited"}  # PIE-Bench's mask: the edited region too
