"""models.py: the family table, noising and targets against their formulas, prompt encoding, errors."""
import pytest
import torch

import models


def test_every_family_has_the_same_facts():
    keys = set(models.FAMILIES["sd3"])
    for name, facts in models.FAMILIES.items():
        assert set(facts) == keys, name
        assert facts["arch"] in ("mmdit", "unet") and facts["prediction"] in ("flow", "epsilon")


def test_paper_defaults():
    f = models.FAMILIES
    assert (f["sd3"]["n_tokens"], f["sd3"]["token_layers"], f["sd3"]["time_table"]) == (4, 5, True)
    assert f["sdxl"]["token_blocks"] == ("down", "mid") and not f["sdxl"]["time_table"]
    assert f["sd1.5"]["init"] == "uncond" and f["sd1.5"]["token_blocks"] == ("down",)
    assert (f["sd3"]["agsm"]["gamma_pos"], f["sd3"]["agsm"]["gamma_neg"]) == (1.0, 0.1)
    assert f["sd3"]["softrepa"]["dweight"] == 0.0 and f["sd1.5"]["softrepa"]["dweight"] == 10.0


def test_unknown_model_is_one_line():
    with pytest.raises(SystemExit, match="unknown model 'sd4': choose one of"):
        models.check_name("sd4")


def test_missing_tiny_weights_say_how_to_rebuild(tmp_path):
    with pytest.raises(SystemExit, match="pretrain.py --model tiny-sd3"):
        models.load("tiny-sd3", pretrained=str(tmp_path))


def test_offline_hub_model_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as err:
        models.load("sd1.5")
    message = str(err.value)
    assert "\n" not in message and "--pretrained" in message and "hf auth login" in message


def test_ddpm_noising_formula():
    bb = models.build_tiny("tiny-sd1.5")
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, t = models.add_noise(bb, x0, noise, torch.tensor([0.0, 0.5]))
    assert t.tolist() == [0, 500]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.prod(1 - betas[:501]).float()
    torch.testing.assert_close(x_t[1], abar.sqrt() * x0[1] + (1 - abar).sqrt() * noise[1])
    assert models.target(bb, x0, noise) is noise


def test_flow_noising_formula():
    bb = models.build_tiny("tiny-sd3")
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, t = models.add_noise(bb, x0, noise, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(t, torch.tensor([250.0, 1000.0]))
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(models.target(bb, x0, noise), noise - x0)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd1.5"])
def test_encode_and_denoise_tiny(name):
    bb = models.build_tiny(name)
    cond = models.encode_prompts(bb, ["a red circle", ""])
    assert cond["encoder_hidden_states"].shape[:2] == (2, 16)
    assert ("pooled_projections" in cond) == (name == "tiny-sd3")
    assert not cond["encoder_hidden_states"].requires_grad
    x = torch.randn(2, *models.latent_shape(bb))
    out = models.denoise(bb, x, torch.tensor([100.0, 900.0]), cond)
    assert out.shape == x.shape


def test_index_and_cat_conds_handle_nested_dicts():
    cond = {"encoder_hidden_states": torch.arange(6).view(3, 2),
            "added_cond_kwargs": {"time_ids": torch.arange(3).view(3, 1)}}
    picked = models.index_cond(cond, torch.tensor([2, 0, 2]))
    assert picked["encoder_hidden_states"][:, 0].tolist() == [4, 0, 4]
    assert picked["added_cond_kwargs"]["time_ids"].flatten().tolist() == [2, 0, 2]
    both = models.cat_conds([cond, picked])
    assert both["added_cond_kwargs"]["time_ids"].shape == (6, 1)
