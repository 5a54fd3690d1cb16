"""The researcher's path, end to end, on tiny stock pipelines saved to disk as the hub lays them out
(tiny_pipelines.save_stock): `models.load(name, pretrained=folder)` is the very path a user's
`--pretrained /local/copy` takes. The README's real-model train commands are read from the README and
run as written (only --pretrained, --size, --steps, --batch made small): one process and two gloo
ranks, kill and --resume latest, the encoding cache, then sample.py, every editing method of the
family's edit.py with the trained tokens, and eval.py on the records."""

import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_train import free_port, rows, run_rank, write_coco

import data
import edit
import eval as ev
import families
import models
import sample
import softtokens
import step as training
import train

FAMILIES = ["sd3", "sdxl", "sd1.5"]
SMALL = ["--size", "64", "--steps", "2", "--batch", "2", "--workers", "1", "--threads", "1"]
README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


@pytest.fixture(scope="session")
def stock(stock_folder):
    return {family: stock_folder(family) for family in FAMILIES}


@pytest.fixture(scope="session")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, n_images=8, corrupt=0)
    return str(root)


def readme_train_commands():
    """The README's real-model train commands: {(family, launcher): argv after train.py}."""
    text = open(README).read()
    block = text[text.index("## Real models") :]
    block = block[block.index("```bash") : block.index("```", block.index("```bash") + 3)]
    commands = {}
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        if "train.py" not in line:
            continue
        words = shlex.split(line)
        argv = words[words.index("train.py") + 1 :]
        commands[(argv[argv.index("--model") + 1], "torchrun" if words[0] == "torchrun" else "python")] = argv
    return commands


def small(argv, folder, coco, out, loss=None):
    """A README command at test size: the COCO folder and run folder replaced, the stock folder added."""
    argv = [coco if a == "/data/coco" else out if a.startswith("runs/") else a for a in argv]
    if loss:
        argv[argv.index("--loss") + 1] = loss
    return argv + ["--pretrained", folder] + SMALL


def test_the_readme_names_a_train_command_for_every_real_family():
    commands = readme_train_commands()
    assert {family for family, _ in commands} == set(FAMILIES)
    assert any(launcher == "torchrun" for _, launcher in commands)


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_folder_loads_and_the_hooks_see_the_stock_text_stream(stock, family):
    bb = models.load(family, pretrained=stock[family])
    facts = families.FAMILIES[family]
    cond = models.encode_prompts(bb, ["a red cube", "two dogs"])
    key = "encoder_hidden_states"
    # what the stock pipeline encodes with the family's T5 length (SD3: 77 CLIP + 512 T5 positions, the authors'
    # codes' -- the pipeline's own default is 256; UNets: 77)
    encoded = bb.pipe.encode_prompt(
        *(["a red cube"] * (3 if family == "sd3" else 2 if family == "sdxl" else 1)),
        device="cpu",
        **(
            {"do_classifier_free_guidance": False, "max_sequence_length": 512}
            if family == "sd3"
            else {"do_classifier_free_guidance": False}
            if family != "sd1.5"
            else {"num_images_per_prompt": 1, "do_classifier_free_guidance": False}
        ),
    )
    assert cond[key].shape[1] == encoded[0].shape[1] == facts["text_tokens"]
    if family == "sd3":  # --max-sequence-length 256: the stock pipeline's default stream, 333 positions
        short = models.load(family, pretrained=stock[family], max_sequence_length=256)
        stock_default = bb.pipe.encode_prompt("a red cube", "a red cube", "a red cube", device="cpu")[0]
        torch.testing.assert_close(models.encode_prompts(short, ["a red cube"])[key], stock_default)
        assert stock_default.shape[1] == 333 == short.facts["text_tokens"]
    # the text stream the hooked blocks read: the stock length plus the soft tokens, cut back after
    tokens = softtokens.make_tokens(bb, "softrepa")
    seen = []
    blocks = (
        bb.denoiser.transformer_blocks
        if family == "sd3"
        else [m for m in bb.denoiser.modules() if m.__class__.__name__ == "Attention" and m.is_cross_attention]
    )
    handle = softtokens.attach_tokens(bb, tokens.sets)
    probes = [
        b.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True
        )
        for b in blocks[:1]
    ]  # after the token hook
    x = torch.randn((2,) + models.latent_shape(bb, 64))
    models.denoise(bb, x, torch.tensor([500, 500]), cond)
    handle.remove()
    for p in probes:
        p.remove()
    assert seen[0] == facts["text_tokens"] + facts["n_tokens"]


@pytest.mark.parametrize("loss", ["softrepa", "agsm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_readme_train_command_one_process(stock, coco, tmp_path, family, loss):
    argv = next(a for (f, _), a in readme_train_commands().items() if f == family)
    out = str(tmp_path / "run")
    result = train.main(small(argv, stock[family], coco, out, loss))
    assert result["step"] == 2 and os.path.exists(os.path.join(out, "tokens.safetensors"))
    _, meta = softtokens.load(os.path.join(out, "tokens.safetensors"))
    assert meta["model"] == family and meta["loss"] == loss
    assert [r["step"] for r in rows(out)] == ["1", "2"]


@pytest.mark.parametrize("loss", ["softrepa", "agsm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_readme_train_command_two_gloo_ranks(stock, coco, tmp_path, family, loss):
    """The README's command of the family (its torchrun line where it has one) as 2 ranks on gloo: the
    environment torchrun sets, each rank forked from this process (importing diffusers anew per rank
    would cost ~15 s each on this machine)."""
    commands = readme_train_commands()
    argv = commands.get((family, "torchrun")) or commands[(family, "python")]
    out = str(tmp_path / "run")
    mp.start_processes(
        run_rank,
        args=(2, free_port(), small(argv, stock[family], coco, out, loss), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    _, meta = softtokens.load(os.path.join(out, "tokens.safetensors"))
    assert meta["world"] == 2 and meta["model"] == family and meta["loss"] == loss


def test_kill_then_resume_latest_equals_an_uninterrupted_run(stock, coco, tmp_path, monkeypatch):
    argv = readme_train_commands()[("sd3", "torchrun")]
    fixed = ["--lr-period", "1", "--ema-decay", "0.9", "--ckpt-every", "2"]
    whole = train.main(small(argv, stock["sd3"], coco, str(tmp_path / "whole")) + fixed + ["--steps", "4"])
    real_step = training.train_step

    def killed_at_step_3(*args, **kwargs):
        if args[8] == 3:  # the step index: killed before step 3 is taken
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(small(argv, stock["sd3"], coco, str(tmp_path / "split")) + fixed + ["--steps", "4"])
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train.main(
        small(argv, stock["sd3"], coco, str(tmp_path / "split")) + fixed + ["--steps", "4", "--resume", "latest"]
    )
    for name, value in whole["tokens"].state_dict().items():
        torch.testing.assert_close(value, resumed["tokens"].state_dict()[name], rtol=0, atol=1e-6)
    assert [r["loss"] for r in rows(str(tmp_path / "split"))] == [r["loss"] for r in rows(str(tmp_path / "whole"))]


def test_cache_then_training_from_it_gives_the_tokens_of_training_from_images(stock, coco, tmp_path):
    argv = readme_train_commands()[("sd3", "torchrun")]
    cache = str(tmp_path / "cache")
    data.main(
        [
            "cache",
            "--model",
            "sd3",
            "--data",
            coco,
            "--out",
            cache,
            "--pretrained",
            stock["sd3"],
            "--size",
            "64",
            "--store",
            "fp32",
            "--captions-per-image",
            "5",
        ]
    )
    from_images = train.main(small(argv, stock["sd3"], coco, str(tmp_path / "images")))
    from_cache = train.main(
        small([cache if a == "/data/coco" else a for a in argv], stock["sd3"], coco, str(tmp_path / "cached"))
    )
    for name, value in from_images["tokens"].state_dict().items():
        torch.testing.assert_close(value, from_cache["tokens"].state_dict()[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="session")
def trained(stock, coco, tmp_path_factory):
    """AGSM tokens of each family, trained by the README's command at test size."""
    out = {}
    for family in FAMILIES:
        argv = next(a for (f, _), a in readme_train_commands().items() if f == family)
        run = str(tmp_path_factory.mktemp(f"trained-{family}"))
        train.main(small(argv, stock[family], coco, run, "agsm"))
        out[family] = os.path.join(run, "tokens.safetensors")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_every_edit_method_and_eval_with_the_trained_tokens(stock, trained, tmp_path, family, tiny_clip_dir):
    import shutil

    from PIL import Image

    backbone = ["--model", family, "--pretrained", stock[family], "--size", "64", "--threads", "1"]
    run = tmp_path / "samples"
    sample.main(
        backbone
        + [
            "--tokens",
            trained[family],
            "--prompt",
            "a red cube",
            "--seed",
            "0",
            "1",
            "--steps",
            "2",
            "--out",
            str(run),
        ]
    )
    records = [json.loads(line) for line in open(run / "records.jsonl")]
    assert len(records) == 2 and all(os.path.exists(run / r["image"]) or os.path.exists(r["image"]) for r in records)
    Image.fromarray(
        np.asarray(
            Image.open(
                os.path.join(run, records[0]["image"])
                if not os.path.isabs(records[0]["image"])
                else records[0]["image"]
            )
        )
    ).save(tmp_path / "source.png")
    prediction = families.FAMILIES[family]["prediction"]
    methods = [m for m, spec in edit.METHODS.items() if spec["prediction"] == prediction]
    for method in methods:
        out = tmp_path / f"edit-{method}"
        edit.main(
            backbone
            + [
                "--image",
                str(tmp_path / "source.png"),
                "--src",
                "a red cube",
                "--tgt",
                "a blue cube",
                "--method",
                method,
                "--steps",
                "2",
                "--tokens",
                trained[family],
                "--out",
                str(out),
            ]
        )
        assert (out / "edited-tokens.png").exists(), method
    weights = tmp_path / "weights"
    shutil.copytree(tiny_clip_dir, weights / "clip-vit-large-patch14")
    groups = ev.main(
        ["--runs", str(run), "--metrics", "clip", "--weights", str(weights), "--json", str(tmp_path / "eval.json")]
    )
    (group,) = groups.values()
    assert np.isfinite(group["metrics"]["clip"]["mean"])


@pytest.mark.parametrize("script", ["train", "sample", "edit", "cache"])
def test_one_size_rule_for_every_script(stock, coco, tmp_path, script):
    """sd1.5 takes multiples of 64 in every script (its UNet halves the 8x latents three times)."""
    common = ["--model", "sd1.5", "--pretrained", stock["sd1.5"], "--size", "32"]
    run = {
        "train": lambda: train.main(common + ["--loss", "agsm", "--data", coco, "--out", str(tmp_path / "r")]),
        "sample": lambda: sample.main(common + ["--prompt", "a cube", "--out", str(tmp_path / "s")]),
        "edit": lambda: edit.main(
            common
            + [
                "--image",
                str(tmp_path / "x.png"),
                "--src",
                "a",
                "--tgt",
                "b",
                "--method",
                "ddim",
                "--out",
                str(tmp_path / "e"),
            ]
        ),
        "cache": lambda: data.main(["cache"] + common + ["--data", coco, "--out", str(tmp_path / "c")]),
    }[script]
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit, match=re.escape("does not fit sd1.5: it takes sides that are multiples of 64")):
        run()


@pytest.mark.parametrize("script", ["train", "sample"])
def test_a_size_beyond_the_loaded_models_positional_table_is_one_line(stock, coco, tmp_path, script):
    """The test-size MM-DiT's positional table is 16 x 16 patches of 2 latents: 256 px at most."""
    common = ["--model", "sd3", "--pretrained", stock["sd3"], "--size", "512", "--steps", "1"]
    run = {
        "train": lambda: train.main(common + ["--loss", "agsm", "--data", coco, "--out", str(tmp_path / "r")]),
        "sample": lambda: sample.main(common + ["--prompt", "a cube", "--out", str(tmp_path / "s")]),
    }[script]
    with pytest.raises(SystemExit, match="positional table"):
        run()


@pytest.mark.parametrize("family", ["sd3.5-medium", "sd3.5-large"])
def test_sd35_from_a_folder_trains_agsm_and_samples_with_its_tokens(tmp_path, coco, stock_folder, family):
    """SD3.5 (issue: the backbones people fork onto now) through the same path as SD3: a stock pipeline
    on disk, --pretrained, train.py (AGSM, per-row token sets), then sample.py with the tokens."""
    folder = stock_folder(family)
    argv = [a.replace("sd3", family) if a == "sd3" else a for a in readme_train_commands()[("sd3", "torchrun")]]
    out = str(tmp_path / "run")
    result = train.main(small(argv, folder, coco, out, "agsm"))
    assert result["step"] == 2
    _, meta = softtokens.load(os.path.join(out, "tokens.safetensors"))
    assert meta["model"] == family and meta["loss"] == "agsm"
    run = tmp_path / "samples"
    sample.main(
        [
            "--model",
            family,
            "--pretrained",
            folder,
            "--size",
            "64",
            "--threads",
            "1",
            "--steps",
            "2",
            "--tokens",
            os.path.join(out, "tokens.safetensors"),
            "--prompt",
            "a red cube",
            "--compare",
            "--out",
            str(run),
        ]
    )
    records = [json.loads(line) for line in open(run / "records.jsonl")]
    images = [np.asarray(__import__("PIL.Image").Image.open(run / r["image"])) for r in records]
    assert len(images) == 2 and not np.array_equal(images[0], images[1])  # the tokens change the image


def test_a_locally_saved_checkpoint_is_the_one_loaded_and_trained(tmp_path, coco, stock_folder):
    """A fine-tuned checkpoint of a real family (e.g. a preference-tuned UNet put into a copy of the base
    pipeline's folder) is what --pretrained loads and trains: its weights, not the base's or the hub's."""
    import shutil

    base = stock_folder("sd1.5")  # copied below, never written to
    tuned = str(tmp_path / "tuned")
    shutil.copytree(base, tuned)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tuned, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "the fine-tune": every weight moved
    unet.save_pretrained(os.path.join(tuned, "unet"))
    loaded = models.load("sd1.5", pretrained=tuned)
    for name, value in unet.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[name], value), name
    argv = readme_train_commands()[("sd1.5", "torchrun")]
    runs = {
        which: train.main(small(argv, folder, coco, str(tmp_path / f"run-{which}"), "agsm"))
        for which, folder in (("base", base), ("tuned", tuned))
    }
    a, b = runs["base"]["tokens"].state_dict(), runs["tuned"]["tokens"].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if "ema" not in k)  # trained on the tuned weights


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A few images with same-named .txt captions (data.py's image-folder layout), of odd sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for i, caption in enumerate(["a red cube", "two blue balls", "a green dog", "a cat on a sofa"]):
        pixels = np.random.default_rng(i).integers(0, 256, (72 + 8 * i, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return str(root)


@pytest.mark.parametrize("family,losses", [("flux-dev", ["softrepa", "agsm"]), ("flux-schnell", ["agsm"])])
def test_flux_from_a_folder_trains_samples_and_edits_with_its_tokens(
    tmp_path, image_folder, stock_folder, family, losses
):
    """FLUX.1 (issue #27) through the same path as SD3: a stock FluxPipeline on disk, --pretrained, the README's
    SD3 train command with --model changed (images + .txt captions), then sample.py with the tokens (dev:
    one branch a step, the cfg scale as its guidance input; schnell: its 4 steps, no CFG) and edit.py's
    FlowEdit (SD3's settings: its cfg scales go in as dev's guidance)."""
    folder = stock_folder(family)
    argv = [family if a == "sd3" else a for a in readme_train_commands()[("sd3", "torchrun")]]
    for loss in losses:
        out = str(tmp_path / f"run-{loss}")
        assert train.main(small(argv, folder, image_folder, out, loss))["step"] == 2
        _, meta = softtokens.load(os.path.join(out, "tokens.safetensors"))
        assert meta["model"] == family and meta["loss"] == loss
    backbone = ["--model", family, "--pretrained", folder, "--size", "64", "--threads", "1"]
    run = tmp_path / "samples"
    sample.main(
        backbone
        + [
            "--tokens",
            os.path.join(out, "tokens.safetensors"),
            "--prompt",
            "a red cube",
            "--compare",
            "--out",
            str(run),
        ]
        + (["--steps", "2"] if family == "flux-dev" else [])
    )
    records = [json.loads(line) for line in open(run / "records.jsonl")]
    images = [np.asarray(__import__("PIL.Image").Image.open(run / r["image"])) for r in records]
    assert len(images) == 2 and not np.array_equal(images[0], images[1])  # the tokens change the image
    assert (records[0]["steps"], records[0]["cfg"]) == ((2, 3.5) if family == "flux-dev" else (4, 1.0))  # defaults
    edit.main(
        backbone
        + [
            "--image",
            str(run / records[0]["image"]),
            "--src",
            "a red cube",
            "--tgt",
            "a blue cube",
            "--method",
            "flowedit",
            "--steps",
            "2",
            "--tokens",
            os.path.join(out, "tokens.safetensors"),
            "--out",
            str(tmp_path / "edit"),
        ]
    )
    assert (tmp_path / "edit" / "edited-tokens.png").exists()
