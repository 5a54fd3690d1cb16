"""SoftREPA's counting loss (app. D; losses.py): the caption's count, the one-step x0 prediction, the
differentiable counters (the shipped shapes counter, a transformers detector from a folder), and the
training step with --count-weight (chunking does not change it; a caption without a count adds nothing)."""

import json
import os
import types

import numpy as np
import pytest
import tolerances
import torch

import counting
import families
import losses
import models
import shapes
import train
from shapes import checker

FAST = ["--threads", "1", "--batch", "4", "--workers", "1", "--log-every", "100"]


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("three red squares", (3, "square")),
        ("two blue circles", (2, "circle")),
        ("a photo of four dogs", (4, "dog")),
        ("two cats on a mat", (2, "cat")),
        ("5 buses parked in a row", (5, "bus")),
        ("two people", (2, "people")),
        ("a red circle and a blue square", None),
        ("a white triangle", None),
    ],
)
def test_prompt_count_reads_the_count_and_the_object(caption, expected):
    assert losses.prompt_count(caption) == expected


def test_every_counting_prompt_of_the_shapes_world_is_read_exactly():
    for record in shapes.load_dev_set() + shapes.load_eval_set():
        spec = record["spec"]
        if spec["category"] == "counting":
            assert losses.prompt_count(record["prompt"]) == (spec["count"], spec["objects"][0]["shape"])
        else:
            assert losses.prompt_count(record["prompt"]) is None


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
def test_one_step_x0_inverts_the_forward_process(name):
    """With the true target as the prediction, x0_hat is x0 (flow: x_t - s v; DDPM: eq. of step 2)."""
    bb = types.SimpleNamespace(facts=families.FAMILIES[name], alphas_cumprod=models.ddpm_alphas_cumprod())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    x_t, t = models.add_noise(bb, x0, noise, torch.tensor([0.1, 0.5, 0.9]))
    x0_hat = losses.one_step_x0(models.target(bb, x0, noise), x_t, t, bb.facts["prediction"], bb.alphas_cumprod)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-4)


def test_rows_without_a_count_or_with_an_unknown_object_add_nothing():
    soft = torch.tensor([2.5, 1.0, float("nan")], requires_grad=True)
    rows = losses.count_row_losses(soft, torch.tensor([3.0, float("nan"), 2.0]))
    assert rows.tolist() == [0.25, 0.0, 0.0]
    rows.sum().backward()
    assert soft.grad.tolist() == [-1.0, 0.0, 0.0]


def test_the_shipped_shapes_counter_counts_held_out_renders_and_has_a_gradient():
    counter = checker.load_counter()
    images, counts = [], []
    for i, record in enumerate([r for r in shapes.load_dev_set() if r["spec"]["category"] == "counting"][:30]):
        images.append(shapes.render(record["spec"], 32, 1000 + i))
        counts.append(record["spec"]["count"])
    images = shapes.to_tensor(images).requires_grad_(True)
    nouns = [
        r["spec"]["objects"][0]["shape"]
        for r in [r for r in shapes.load_dev_set() if r["spec"]["category"] == "counting"][:30]
    ]
    soft = counter.soft_count(images, nouns)
    assert (soft.round() == torch.tensor(counts, dtype=soft.dtype)).float().mean() >= 0.9
    soft.sum().backward()
    assert images.grad.abs().sum() > 0
    assert torch.isnan(counter.soft_count(images[:1].detach(), ["dog"])).all()  # not a shape of this world


def save_tiny_detr(folder, labels):
    """A random DETR (ResNet backbone, no download) saved with save_pretrained: a detector folder of --counter."""
    from transformers import DetrConfig, DetrForObjectDetection

    config = DetrConfig(
        use_timm_backbone=False,
        backbone_config=dict(
            model_type="resnet",
            embedding_size=8,
            hidden_sizes=[8, 8, 8, 8],
            depths=[1, 1, 1, 1],
            out_features=["stage4"],
        ),
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=5,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    DetrForObjectDetection(config).save_pretrained(folder)


def test_a_transformers_detector_from_a_folder_is_a_soft_counter(tmp_path):
    save_tiny_detr(tmp_path / "detr", ["cat", "dog", "person"])
    counter = counting.open_detector(str(tmp_path / "detr"), "cpu")
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    soft = counter.soft_count(images, ["cat", "zebra"])
    assert 0 < soft[0] < 5 and torch.isnan(soft[1])  # at most one detection per query; no "zebra" label
    soft[0].backward()
    assert images.grad.abs().sum() > 0


def test_counter_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--count-weight needs --counter FOLDER"):
        counting.open_detector(None, "cpu")
    with pytest.raises(SystemExit, match="is an empty folder; expected a transformers object-detector folder"):
        counting.open_detector(str(tmp_path), "cpu")
    with pytest.raises(SystemExit) as e:
        train.main(
            FAST + ["--model", "tiny-sd3", "--loss", "softrepa", "--count-weight", "nan", "--out", str(tmp_path / "r")]
        )
    assert (
        e.value.code == 2
    )  # the parser's refusal (flags.NON_NEGATIVE_FLOAT); tests/method/test_flags.py tries every flag


def counting_batch_run(tmp_path, name, extra):
    """Two steps on a fixed batch of captions, half of which ask for a count."""
    return train.main(
        FAST
        + [
            "--model",
            "tiny-sd3",
            "--loss",
            "softrepa",
            "--steps",
            "2",
            "--data",
            str(tmp_path / "captions.jsonl"),
            "--out",
            str(tmp_path / name),
        ]
        + extra
    )


def write_captions(tmp_path):
    records = [r for r in shapes.load_dev_set() if r["spec"]["category"] in ("counting", "colors")][::4][:8]
    os.makedirs(tmp_path / "images", exist_ok=True)
    from PIL import Image

    with open(tmp_path / "captions.jsonl", "w") as f:
        for i, r in enumerate(records):
            Image.fromarray(shapes.render(r["spec"], 32, i)).save(tmp_path / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "caption": r["prompt"]}) + "\n")


def test_the_counting_loss_trains_and_chunking_does_not_change_the_step(tmp_path):
    write_captions(tmp_path)
    plain = counting_batch_run(tmp_path, "plain", [])
    counted = counting_batch_run(tmp_path, "count", ["--count-weight", "1"])
    chunked = counting_batch_run(tmp_path, "chunked", ["--count-weight", "1", "--rows-per-forward", "1"])
    for k, v in counted["tokens"].state_dict().items():
        assert not torch.equal(v, plain["tokens"].state_dict()[k])  # the count's gradient moved them
        # the same step up to float order: the VAE and the counter see 1 row at a time instead of 4
        torch.testing.assert_close(chunked["tokens"].state_dict()[k], v, **tolerances.REORDERED_FP32)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "count" / "log.csv")))
    assert all(float(r["count_error"]) >= 0 for r in rows) and any(float(r["count_error"]) > 0 for r in rows)


def test_a_real_family_trains_with_a_detector_from_a_folder(tmp_path, stock_folder):
    """The counting loss on a real family: the stock SD3 pipeline on disk (--pretrained), a transformers
    detector saved to a folder (--counter), captions that ask for counts."""
    from PIL import Image

    save_tiny_detr(tmp_path / "detr", ["cat", "dog"])
    folder = stock_folder("sd3")
    for i, caption in enumerate(["two cats on a sofa", "three dogs", "a red car", "four cats"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        (tmp_path / f"{i}.txt").write_text(caption)
    argv = [
        "--model",
        "sd3",
        "--pretrained",
        folder,
        "--loss",
        "softrepa",
        "--data",
        str(tmp_path),
        "--size",
        "64",
        "--steps",
        "2",
        "--batch",
        "4",
        "--workers",
        "1",
        "--threads",
        "1",
    ]
    plain = train.main(argv + ["--out", str(tmp_path / "plain")])
    counted = train.main(
        argv + ["--out", str(tmp_path / "count"), "--count-weight", "1", "--counter", str(tmp_path / "detr")]
    )
    assert any(not torch.equal(v, plain["tokens"].state_dict()[k]) for k, v in counted["tokens"].state_dict().items())
    import csv

    rows = list(csv.DictReader(open(tmp_path / "count" / "log.csv")))
    assert all(float(r["count_error"]) > 0 for r in rows)  # 3 of the 4 captions ask for a count
