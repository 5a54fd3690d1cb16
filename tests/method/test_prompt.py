"""prompt.py / train.py --params prompt: vectors take the placeholders' places at the text encoder's input
(and nowhere else), the gradient reaches them through the frozen encoder, the run's file is read and put
on a backbone by trained.py, a resumed run ends where an uninterrupted one does, bad flags fail in one line."""

import pytest
import torch

import models
import prompt
import train
import trained
from shapes import backbones, world

FAST = ["--random-init", "--batch", "2", "--threads", "1", "--workers", "1", "--model", "tiny-sd3", "--data", "shapes"]


def test_placed_puts_the_kth_vector_at_the_kth_placeholder_of_each_row():
    ids = torch.tensor([[1, 9, 9, 5], [1, 5, 6, 7], [1, 9, 5, 9]])
    embeddings = torch.zeros(3, 4, 2)
    vectors = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    out = prompt.placed(embeddings, ids, vectors, 9)
    assert out[0, 1].tolist() == [1, 1] and out[0, 2].tolist() == [2, 2] and out[0, 3].tolist() == [0, 0]
    assert torch.equal(out[1], embeddings[1])  # no placeholder: untouched
    assert out[2, 1].tolist() == [1, 1] and out[2, 3].tolist() == [2, 2]
    per_row = torch.arange(12.0).view(3, 2, 2)  # (B, n, d): each row its own vectors
    assert prompt.placed(embeddings, ids, per_row, 9)[2, 3].tolist() == per_row[2, 1].tolist()
    with pytest.raises(ValueError, match="3 placeholders for 2 vectors"):
        prompt.placed(embeddings, torch.tensor([[9, 9, 9, 1]]), vectors, 9)


def test_the_gradient_reaches_the_vectors_through_the_frozen_encoder():
    bb = backbones.load("tiny-sd3", random_init=True)
    bb.text_encoder.requires_grad_(False)
    p = prompt.make(bb, 2, "red")
    assert torch.equal(p.vectors[0], bb.text_encoder.get_input_embeddings().weight[world.WORD_TO_ID["red"]])
    cond = p.encode(bb, ["a blue square", ""])
    plain = models.encode_prompts(bb, ["a blue square", ""])
    assert torch.equal(cond["encoder_hidden_states"][1], plain["encoder_hidden_states"][1])  # "" stays ""
    cond["encoder_hidden_states"][0].sum().backward()
    assert p.vectors.grad is not None and p.vectors.grad.abs().sum() > 0
    assert all(q.grad is None for q in bb.text_encoder.parameters())


@pytest.mark.parametrize("loss", ["dsm", "softrepa"])
def test_a_prompt_trains_and_its_file_samples_through_trained(tmp_path, loss):
    result = train.main(
        FAST + ["--params", "prompt", "--loss", loss, "--steps", "2", "--lr", "1e-1", "--out", str(tmp_path / "r")]
    )
    path = result["tokens_path"]
    assert path.endswith("prompt.safetensors") and prompt.is_prompt_file(path)
    bb = backbones.load("tiny-sd3", random_init=True)
    start = bb.text_encoder.get_input_embeddings().weight[world.WORD_TO_ID["a"]]
    loaded = trained.read(path, "tiny-sd3")
    assert loaded.token_set == "prompt" and not torch.equal(loaded.sets.vectors[0], start)  # it moved
    plain = models.encode_prompts(bb, ["a red square", ""])
    with trained.attached(bb, loaded):
        read = models.encode_prompts(bb, ["a red square", ""])
        assert bb.tokenize(["a red square"])[0, 1] == world.UNK_ID  # the placeholder after <bos>
    assert not torch.equal(read["encoder_hidden_states"][0], plain["encoder_hidden_states"][0])
    assert torch.equal(read["encoder_hidden_states"][1], plain["encoder_hidden_states"][1])
    assert torch.equal(
        models.encode_prompts(bb, ["a red square"])["encoder_hidden_states"][0], plain["encoder_hidden_states"][0]
    )


def test_resume_ends_like_an_uninterrupted_run(tmp_path):
    argv = FAST + [
        "--params",
        "prompt",
        "--loss",
        "dsm",
        "--lr-period",
        "1",
        "--ckpt-every",
        "1",
        "--prompt-vectors",
        "2",
    ]
    uninterrupted = train.main(argv + ["--steps", "3", "--out", str(tmp_path / "a")])
    train.main(argv + ["--steps", "1", "--out", str(tmp_path / "b")])
    resumed = train.main(argv + ["--steps", "3", "--out", str(tmp_path / "b"), "--resume", "latest"])
    assert torch.equal(uninterrupted["tokens"].vectors, resumed["tokens"].vectors)
    with pytest.raises(SystemExit, match="prompt_vectors=2"):  # the recipe is kept on resume
        train.main(argv[:-1] + ["3", "--steps", "4", "--out", str(tmp_path / "b"), "--resume", "latest"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--params", "prompt", "--loss", "agsm"], "two token sets"),
        (["--params", "prompt", "--loss", "dsm", "--layers", "2"], "--layers does nothing in this run"),
        (["--params", "prompt", "--loss", "dsm", "--prompt-init", "zebra"], "not a word of tiny-sd3's vocabulary"),
        (["--params", "tokens", "--loss", "dsm", "--prompt-init", "red"], "--prompt-init does nothing in this run"),
    ],
)
def test_bad_flags_fail_in_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train.main(FAST + ["--steps", "1", "--out", str(tmp_path / "r")] + extra)


def test_an_sd15_prompt_file_loads_with_the_stock_pipelines_load_textual_inversion(tmp_path, stock_folder):
    import diffusers

    folder = stock_folder("sd1.5")
    bb = models.load("sd1.5", pretrained=folder)
    p = prompt.make(bb, 2, "a")
    with torch.no_grad():
        p.vectors.add_(torch.randn(p.vectors.shape, generator=torch.Generator().manual_seed(0)))
    ours = p.encode(bb, ["b c", ""], grad=False)["encoder_hidden_states"]
    path = str(tmp_path / "prompt.safetensors")
    prompt.save(path, p, model="sd1.5")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(path, token="<x>")
    stock, _ = pipe.encode_prompt(["<x> b c", ""], "cpu", 1, False)
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-6)
    plain, _ = pipe.encode_prompt(["b c"], "cpu", 1, False)
    assert not torch.allclose(plain, ours[:1])


def test_an_sdxl_prompt_trains_both_encoders_and_writes_clip_l_and_clip_g(tmp_path, stock_folder):
    from safetensors.torch import load_file

    bb = models.load("sdxl", pretrained=stock_folder("sdxl"))
    p = prompt.make(bb, 1, "a")
    cond = p.encode(bb, ["b c"])
    (cond["encoder_hidden_states"].sum() + cond["added_cond_kwargs"]["text_embeds"].sum()).backward()
    assert p.vectors.grad.abs().sum() > 0 and p.vectors_2.grad.abs().sum() > 0
    path = str(tmp_path / "prompt.safetensors")
    prompt.save(path, p, model="sdxl")
    saved = load_file(path)
    assert sorted(saved) == ["clip_g", "clip_l"] and saved["clip_l"].shape == p.vectors.shape
    with pytest.raises(SystemExit, match="no textual-inversion format"):
        prompt.make(models.load("sd3", pretrained=stock_folder("sd3")), 1, "a")
