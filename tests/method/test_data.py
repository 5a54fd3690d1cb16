"""data.py: the record readers (COCO 2014/2017, JSONL, folder), resize + centre crop, the step-derived
data order, skipping unreadable images, the shapes stream and the memory-mapped encoding cache."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import models
from shapes import backbones, bench, pairs


def write_coco(root, year="2017", n=4, corrupt=(), split="train"):
    os.makedirs(root / "annotations", exist_ok=True)
    os.makedirs(root / f"{split}{year}", exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        name = f"{i:012d}.jpg" if year == "2017" else f"COCO_{split}{year}_{i:012d}.jpg"
        path = root / f"{split}{year}" / name
        if i in corrupt:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((36, 48, 3), 20 * i, np.uint8)).save(path, quality=100)
        images.append({"id": 7 + i, "file_name": name})
        annotations += [
            {"id": 100 * i + k, "image_id": 7 + i, "caption": f" image {i} caption {k} "} for k in range(5)
        ]
    with open(root / "annotations" / f"captions_{split}{year}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)


@pytest.mark.parametrize("year", ["2014", "2017"])
def test_coco_layouts_give_image_paths_and_five_captions(tmp_path, year):
    write_coco(tmp_path, year)
    for spec in (str(tmp_path), str(tmp_path / "annotations" / f"captions_train{year}.json")):
        records = data.read_records(spec)
        assert len(records) == 4
        path, caps = records[1]
        assert os.path.exists(path) and path.endswith("000000000001.jpg") and (year in path)
        assert caps == [f"image 1 caption {k}" for k in range(5)]  # stripped, in file order


def test_jsonl_and_folder_sources(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("first caption\nsecond caption\n")
    (tmp_path / "c.txt").write_text("a caption without an image\n")
    assert data.read_records(str(tmp_path)) == [(str(tmp_path / "a.png"), ["first caption", "second caption"])]
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"image": "a.png", "caption": "one"})
        + "\n\n"
        + json.dumps({"file_name": "b.png", "captions": ["x", "y"]})
        + "\n"
    )
    assert data.read_records(str(tmp_path / "pairs.jsonl")) == [
        (str(tmp_path / "a.png"), ["one"]),
        (str(tmp_path / "b.png"), ["x", "y"]),
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "no such file or folder"),
        (lambda p: str(p), "found no image-caption pairs"),
        (lambda p: (p / "x.csv").write_text("") or str(p / "x.csv"), "expected a COCO folder"),
    ],
)
def test_wrong_paths_fail_in_one_line(tmp_path, make, message):
    with pytest.raises(SystemExit) as e:
        data.open_source(make(tmp_path), 32, 0)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_coco_json_without_its_image_folder_fails_at_start(tmp_path):
    write_coco(tmp_path)
    os.rename(tmp_path / "train2017", tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match="image folder .*train2017 does not exist"):
        data.read_records(str(tmp_path))


def test_resize_and_centre_crop_against_written_out_pixels(tmp_path):
    # 4 x 2 image, size 2: the shorter side is already 2, so only the centre crop acts: columns 1 and 2
    pixels = np.array(
        [[[0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0]], [[0, 50, 0], [10, 50, 0], [20, 50, 0], [30, 50, 0]]],
        np.uint8,
    )
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    expected = torch.tensor([[[10, 20], [10, 20]], [[0, 0], [50, 50]], [[0, 0], [0, 0]]]) / 127.5 - 1
    torch.testing.assert_close(data.load_image(tmp_path / "wide.png", 2), expected.float())
    # a tall 30 x 90 image at 16: shorter side 30 -> 16, the other 90 -> 48, then the centre 16 rows
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[:, :, 1] = 200
    tall[45 - 24 : 45 + 24, :, 0] = 255  # a red band 48 rows tall around the middle: the crop sees only red
    Image.fromarray(tall).save(tmp_path / "tall.png")
    image = data.load_image(tmp_path / "tall.png", 16)
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image[0], torch.full((16, 16), 1.0), atol=2 / 255, rtol=0)
    # grey, palette and RGBA files come out as RGB
    Image.new("L", (20, 20), 255).save(tmp_path / "grey.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert data.load_image(tmp_path / "grey.png", 8).eq(1).all()
    assert data.load_image(tmp_path / "rgba.png", 8).eq(-1).all()


def test_batches_are_a_function_of_seed_step_rank(tmp_path):
    write_coco(tmp_path, n=8)
    source = data.open_source(str(tmp_path), 16, seed=3, workers=2)
    again = data.open_source(str(tmp_path), 16, seed=3, workers=1)
    # 8 images, 2 ranks x batch 2: epoch = 2 steps; every image once per epoch, ranks disjoint
    seen = []
    for step in (0, 1):
        for rank in (0, 1):
            b = data.get_batch(source, step, rank, world=2, batch=2)
            assert b["images"].shape == (2, 3, 16, 16) and b["new_bad"] == 0
            seen += [int(c.split()[1]) for c in b["captions"]]
    assert sorted(seen) == list(range(8))
    # same (seed, step, rank) -> same batch, in any call order (what makes resuming exact)
    late = data.get_batch(source, 5, 1, 2, 2)
    assert data.get_batch(again, 5, 1, 2, 2)["captions"] == late["captions"]
    torch.testing.assert_close(data.get_batch(again, 5, 1, 2, 2)["images"], late["images"])
    # a random one of the 5 captions per image and epoch
    picks = {int(c.split()[-1]) for step in range(0, 40, 2) for c in data.get_batch(source, step, 0, 2, 2)["captions"]}
    assert len(picks) > 2
    with pytest.raises(SystemExit, match="fewer than one global batch"):
        data.get_batch(source, 0, 0, world=4, batch=3)


def test_unreadable_images_are_replaced_and_counted_once(tmp_path, capsys):
    write_coco(tmp_path, n=6, corrupt=(2,))
    os.remove(tmp_path / "train2017" / "000000000004.jpg")  # missing counts as unreadable too
    source = data.open_source(str(tmp_path), 16, seed=0)
    captions, bad = [], 0
    for step in range(9):  # 3 epochs of 3 steps
        b = data.get_batch(source, step, 0, 1, 2)
        assert b["images"].shape == (2, 3, 16, 16)
        bad += b["new_bad"]
        captions += [int(c.split()[1]) for c in b["captions"]]
    assert bad == 2 and source["bad"] == {2, 4}
    assert not {2, 4} & set(captions)
    assert capsys.readouterr().err.count("skipping unreadable image") == 2
    # the replacement is deterministic: a fresh source gives the same batch
    fresh = data.open_source(str(tmp_path), 16, seed=0)
    assert [data.get_batch(fresh, s, 0, 1, 2)["captions"] for s in range(9)] == [
        data.get_batch(source, s, 0, 1, 2)["captions"] for s in range(9)
    ]


def test_shapes_source_is_reproducible_and_differs_by_rank():
    source = pairs.open_stream("shapes", 32, seed=1)
    a, b = data.get_batch(source, 4, 0, 2, 3), data.get_batch(source, 4, 0, 2, 3)
    assert a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])
    assert a["images"].shape == (3, 3, 32, 32) and a["images"].min() >= -1 and a["images"].max() <= 1
    assert data.get_batch(source, 4, 1, 2, 3)["captions"] != a["captions"]


def test_bytes_per_sample_of_sd3_at_1024_and_at_its_training_size():
    latent, text, pooled = models.feature_shapes("sd3", 1024)
    # 16*128*128 + 589*4096 + 2048 = 262144 + 2412544 + 2048 = 2676736 numbers (77 CLIP + 512 T5 positions)
    assert bench.bytes_per_sample(latent, text, pooled, 2) == 5_353_472
    assert bench.bytes_per_sample(latent, text, pooled, 4) == 10_706_944
    # the cache's default: the authors' training size, 512 px: 16*64*64 + 589*4096 + 2048 numbers
    latent, text, pooled = models.feature_shapes("sd3")
    assert latent == (16, 64, 64) and bench.bytes_per_sample(latent, text, pooled, 2) == 2 * (65536 + 2412544 + 2048)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
def test_cache_shards_hold_the_encodings_in_bf16(tmp_path, name):
    write_coco(tmp_path / "coco", n=5, corrupt=(1,))
    records = data.read_records(str(tmp_path / "coco"))
    bb = backbones.build_tiny(name)
    # shard_gb tiny enough for 2 images per shard: 4 readable images -> 2 shards
    per_image = int(np.prod(models.latent_shape(bb, 32))) + 2 * 16 * 128 + (2 * 128 if name == "tiny-sd3" else 0)
    meta = data.write_cache(
        bb, records, str(tmp_path / "cache"), 32, captions_per_image=2, batch=3, shard_gb=2.5 * per_image * 2 / 1e9
    )
    assert meta["images"] == 4 and meta["skipped"] == 1 and len(meta["shards"]) == 2
    files = sorted(f for f in os.listdir(tmp_path / "cache") if f.endswith(".bin"))
    assert len(files) == 2 * (3 if name == "tiny-sd3" else 2)  # a few files per shard, not one per sample
    total = sum(os.path.getsize(tmp_path / "cache" / f) for f in files)
    assert total == 4 * per_image * 2  # bf16: 2 bytes per number, nothing else
    # read back through the training source: same numbers as encoding now, to bf16 precision
    source = data.open_source(str(tmp_path / "cache"), 32, seed=0)
    batch = data.get_batch(source, 1, 0, 1, 2)
    assert batch["latents"].dtype == torch.bfloat16 and batch["latents"].shape == (2, *models.latent_shape(bb, 32))
    paths = {int(r[0][-6:-4]): r[0] for r in records}
    images = torch.stack([data.load_image(paths[int(c.split()[1])], 32) for c in batch["captions"]])
    torch.testing.assert_close(
        batch["latents"].float(), models.encode_images(bb, images, mode=True), atol=1e-2, rtol=1e-2
    )
    with torch.no_grad():
        reference = models.encode_prompts(bb, batch["captions"])
    cond = models.cond_from_features(
        bb, batch["hidden"].float(), None if batch["pooled"] is None else batch["pooled"].float()
    )
    assert cond.keys() == reference.keys()
    for key in cond:
        torch.testing.assert_close(cond[key], reference[key], atol=3e-2, rtol=1e-2)
    with pytest.raises(SystemExit, match="encoded at 32 px"):
        data.open_source(str(tmp_path / "cache"), 64, seed=0)


def test_training_from_a_cache(tmp_path):
    import train

    write_coco(tmp_path / "coco", n=4)
    bb = backbones.build_tiny("tiny-sd3")
    data.write_cache(bb, data.read_records(str(tmp_path / "coco")), str(tmp_path / "cache"), 32)
    result = train.main(
        [
            "--model",
            "tiny-sd3",
            "--loss",
            "softrepa",
            "--random-init",
            "--batch",
            "2",
            "--steps",
            "2",
            "--data",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "run"),
            "--threads",
            "1",
        ]
    )
    assert result["step"] == 2 and os.path.exists(result["tokens_path"])
    with pytest.raises(SystemExit, match="holds tiny-sd3's encodings"):
        train.main(
            ["--model", "tiny-sd1.5", "--random-init", "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "x")]
        )
