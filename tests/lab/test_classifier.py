"""classifier.py: the held-out diffusion classifier (SoftREPA eqs. 15-18) on known cases: hard negatives
that are false of the image, a perfect oracle scores 1, a text-blind model ties and scores 0, and the
tokens change what a random-weight backbone sees. CPU, offline."""

import numpy as np
import pytest
import torch

import eval as ev
import families
import hooks
import models
import shapes
import softtokens
from shapes import checker, classifier

torch.set_num_threads(1)


def test_distractors_are_hard_negatives():
    records = ev.classifier_records(3)
    for i, record in enumerate(records):
        image = shapes.render(record["spec"], 32, 0)
        picked = classifier.distractors(records, i, image, 3, np.random.default_rng(5))
        assert picked == classifier.distractors(records, i, image, 3, np.random.default_rng(5))  # deterministic
        assert len(set(picked)) == 3 and record["prompt"] not in picked
        pool = {shapes.caption(s): s for s in shapes.all_specs(record["spec"]["category"])}
        for text in picked:  # same category, and false of the image
            spec = pool[text]
            strict = {**spec, "category": classifier.STRICT.get(spec["category"], spec["category"])}
            assert not checker.check(image, strict)
    # Real data: other records' prompts, never one of the image's own captions
    records = [
        {"image": "x.png", "prompt": p, "captions": [p, "a cat"]} for p in ["a cat", "a dog", "a bird", "a cow"]
    ]
    records[1]["captions"] = ["a dog", "a bird"]
    for k in range(5):
        assert sorted(classifier.distractors(records, 1, None, 2, np.random.default_rng(k))) == ["a cat", "a cow"]
    with pytest.raises(ValueError, match="only 2 distractors"):
        classifier.distractors(records, 1, None, 3, np.random.default_rng(0))
    # "a and b" is the same picture as "b and a": never a distractor of it
    record = {
        "prompt": "a red circle and a blue square",
        "spec": {
            "category": "two_object",
            "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
        },
    }
    image = shapes.render(record["spec"], 32, 0)
    assert "a blue square and a red circle" not in classifier.distractors(
        [record], 0, image, 100, np.random.default_rng(0)
    )


def image_records(folder, n=8):
    """Real-data records as train.py passes them: an image file, its prompt and all its captions."""
    from PIL import Image

    rng, records = np.random.default_rng(0), []
    for i, item in enumerate(ev.classifier_records(2)[:n]):
        path = str(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(path)
        records.append({"image": path, "prompt": item["prompt"], "captions": [item["prompt"], "a photo"]})
    return records


@pytest.mark.parametrize("family,data", [("tiny-sd3", "shapes"), ("tiny-sd1.5", "shapes"), ("tiny-sd3", "files")])
def test_a_perfect_oracle_classifies_everything(family, data, tiny_sd3, tmp_path):
    bb = (
        tiny_sd3
        if family == "tiny-sd3"
        else models.Backbone(
            family,
            families.FAMILIES[family],
            tiny_sd3.denoiser,
            text_encoder=tiny_sd3.text_encoder,  # denoiser: replaced
            tokenize=tiny_sd3.tokenize,
            alphas_cumprod=models.ddpm_alphas_cumprod(),
        )
    )
    records = ev.classifier_records(2) if data == "shapes" else image_records(tmp_path)
    assert len({r["prompt"] for r in records}) == len(records)
    real = bb.denoiser
    bb.denoiser = OracleDenoiser(bb, records, seed=3)
    try:
        errors, captions = classifier.classifier_errors(bb, records, n_candidates=4, seed=3)
        assert classifier.classifier_accuracy(bb, records, n_candidates=4, seed=3) == 1.0
    finally:
        bb.denoiser = real
    assert errors.shape == (len(records), 4) and torch.all(errors[:, 0] < 1e-8)
    assert torch.all(errors[:, 1:] > 1e-3)
    assert [c[0] for c in captions] == [r["prompt"] for r in records]


def test_random_weights_classifier_runs_and_sees_the_tokens(tiny_sd3):
    records = ev.classifier_records(1)
    acc = classifier.classifier_accuracy(tiny_sd3, records, n_candidates=3, seed=0, noise_levels=(0.5,))
    errors, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=3, seed=0, noise_levels=(0.5,))
    # by hand: a record counts when its true caption (column 0) has strictly the lowest error
    wins = sum(all(row[0] < e for e in row[1:]) for row in errors.tolist())
    assert errors.shape == (len(records), 3) and acc == pytest.approx(wins / len(records))
    assert acc == classifier.classifier_accuracy(tiny_sd3, records, n_candidates=3, seed=0, noise_levels=(0.5,))
    plain, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=3, noise_levels=(0.5,))
    tokens = softtokens.make_tokens(tiny_sd3, "softrepa")
    with torch.no_grad():
        tokens.tokens.normal_(std=1.0)
    handle = hooks.attach(tiny_sd3.denoiser, tokens)
    try:
        with_tokens, _ = classifier.classifier_errors(
            tiny_sd3, records, n_candidates=3, noise_levels=(0.5,), handle=handle
        )
    finally:
        handle.remove()
    assert not torch.allclose(plain, with_tokens)
    again, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=3, noise_levels=(0.5,))
    assert torch.equal(plain, again)  # removed: the plain model again


def test_a_text_blind_model_ties_and_scores_zero(tiny_sd3):
    """Every candidate of an image sees the same x_t and target (shared t and eps), so a model that
    ignores the text gives exactly equal errors; ties count as wrong."""
    records = ev.classifier_records(1)
    real = tiny_sd3.denoiser
    tiny_sd3.denoiser = TextBlindDenoiser()
    try:
        errors, _ = classifier.classifier_errors(tiny_sd3, records, n_candidates=4)
        accuracy = classifier.classifier_accuracy(tiny_sd3, records, n_candidates=4)
    finally:
        tiny_sd3.denoiser = real
    assert torch.all(errors == errors[:, :1]) and accuracy == 0.0
    assert len(set(errors[:, 0].tolist())) == len(records)  # but images differ


class OracleDenoiser(torch.nn.Module):
    """A perfect model of the shapes data it knows: for a caption that is the true caption of one of
    `records`, it returns the exact target of that record's ground-truth image (the one eval renders)
    under the forward process; for any other caption it returns zeros."""

    def __init__(self, bb, records, seed):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # Backbone.device reads the parameters
        self.bb = [bb]
        self.keys = models.encode_prompts(bb, [r["prompt"] for r in records])["encoder_hidden_states"].flatten(1)
        # the latents the classifier encodes (the posterior mean of the backbone's autoencoder)
        self.x0 = models.encode_images(
            bb, shapes.to_tensor(np.stack(classifier.ground_truth_images(records, seed, 32))), mode=True
        )

    def forward(self, x_t, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        bb, out = self.bb[0], torch.zeros_like(x_t)
        distance = (encoder_hidden_states.flatten(1)[:, None] - self.keys[None]).abs().amax(-1)  # (B, records)
        for b in range(len(x_t)):
            j = int(distance[b].argmin())
            if distance[b, j] > 1e-3:
                continue
            x0 = self.x0[j]
            if bb.facts["prediction"] == "flow":  # x_t = (1 - s) x0 + s eps, target eps - x0
                s = float(timestep[b]) / models.NUM_TRAIN_TIMESTEPS
                out[b] = (x_t[b] - (1 - s) * x0) / s - x0
            else:  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
                abar = bb.alphas_cumprod[int(timestep[b])]
                out[b] = (x_t[b] - abar.sqrt() * x0) / (1 - abar).sqrt()
        return (out,)


class TextBlindDenoiser(torch.nn.Module):
    """Ignores the caption: a fixed function of x_t and t."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x_t, timestep, return_dict=False, **text):
        return (self.scale * x_t * (timestep.view(-1, 1, 1, 1) / 1000),)
