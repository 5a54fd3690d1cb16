"""recipe.py: every setting declared once. The parser, the defaults and the resume rule come from its entries;
a resumed run keeps every setting declared KEEP or CHANGE (walked setting by setting, with values other than the
defaults); a FREE setting never changes the trajectory (so a setting that does cannot hide there); and a flag a
run does not use is refused in one line."""

import json
import os

import pytest
import torch

import recipe
import train
from flags import CHANGE, FREE, KEEP, SWITCH

torch.set_num_threads(1)
FAST = ["--random-init", "--threads", "1", "--workers", "1", "--lr", "0.1"]  # lr 0.1: two steps move the tokens
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A value other than the default for every setting a resumed run keeps, grouped into runs that can take them
# together: each run trains two steps with its values, then resumes without any of them.
KEPT_RUNS = [
    dict(  # AGSM on tokens: its own settings, the tokens' shape, the schedule, the noise
        model="tiny-sd3",
        loss="agsm",
        data="shapes:color_attr,two_object",
        batch=3,
        seed=5,
        lr=0.05,
        wd=0.0,
        min_lr=0.0,
        lr_period=2,
        grad_clip=0.5,
        n_tokens=2,
        layers=3,
        time_table="off",
        init="uncond",
        noise_per_row=True,
        paper_tau=True,
        gamma_pos=0.5,
        gamma_neg=0.3,
        bradley_terry=True,
        plain_sum=True,
        ema_decay=0.5,
        ema_init="draw",
        steps=2,
        count_weight=0.5,
        counter="shapes/weights/counter.safetensors",
        random_init=True,
    ),
    dict(  # SoftREPA on LoRA: the adapters' settings and SoftREPA's
        model="tiny-sd3",
        loss="softrepa",
        params="lora",
        lora_rank=2,
        lora_blocks="all",
        tau=0.3,
        scale=2.0,
        dweight=1.0,
        random_init=True,
    ),
    dict(  # a learned prompt at the text encoder's input, distilled onto the frozen model's prediction for a prefix
        model="tiny-sd3",
        loss="dsm",
        params="prompt",
        prompt_vectors=2,
        prompt_init="red",
        distill_prefix="blue",
        random_init=True,
    ),
    dict(  # the shipped weights named, in bf16
        model="tiny-sd3", loss="dsm", pretrained=os.path.join(ROOT, "shapes", "weights", "tiny-sd3"), precision="bf16"
    ),
    dict(
        model="tiny-sd1.5", loss="softrepa", blocks="down,up", gather_text=True, size=40, random_init=True
    ),  # a UNet: groups, sizes
]
# Kept settings no single-process run can change, and where each is checked instead
NOT_WALKED = {
    "world": "needs several ranks: test_resume_refuses_another_world below",
    "max_sequence_length": "the tiny families read no T5: test_resume_refuses_another_world's config check",
}
# A value other than the default for every FREE setting; all of them at once must leave the step the same
FREE_VALUES = dict(
    rows_per_forward=1,
    threads=2,
    grad_checkpointing=True,
    workers=2,
    ckpt_every=1,
    val_every=2,
    val_n=1,
    val_steps=2,
    log_every=1,
    val_data=None,  # real models only (the shapes world holds its own held-out set)
)
NOT_TRIED_FREE = {
    "compile": "torch.compile takes minutes on the CPU",
    "val_data": "real models only",
    "device": "this machine has one device",
}


def as_argv(values):
    argv = []
    for name, value in values.items():
        if value is None:
            continue
        option = recipe.BY_NAME[name].option if name in recipe.BY_NAME else "--" + name.replace("_", "-")
        argv += [option] if value is True else [option, str(value)]
    return argv


def config(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def test_every_setting_is_declared_whole():
    names = [s.name for s in recipe.SETTINGS]
    assert len(names) == len(set(names))
    for s in recipe.SETTINGS:
        assert s.help and s.resume in (KEEP, CHANGE, FREE), s.name
        assert s.domain is SWITCH or callable(s.domain) or isinstance(s.domain, list), s.name
    # the parser holds exactly the declared flags (and the backbone's and the folder's)
    options = {a.dest for a in train.build_parser()._actions}
    assert {s.name for s in recipe.SETTINGS if s.flag} <= options
    assert options - {s.name for s in recipe.SETTINGS} == {"help", "out", "resume"}  # the command's, not the run's


def test_the_walk_covers_every_kept_setting():
    """Fails when a setting is declared KEEP or CHANGE and no run below gives it a value of its own."""
    walked = set().union(*KEPT_RUNS) | set(NOT_WALKED)
    assert walked == set(recipe.RESUMED)
    assert set(FREE_VALUES) | set(NOT_TRIED_FREE) == {s.name for s in recipe.SETTINGS if s.resume == FREE}
    for values in KEPT_RUNS:  # each value really differs from the default of its run
        defaults = recipe.defaults(values["model"], values["loss"])
        for name, value in values.items():
            if name not in ("model", "loss") and value is not None:
                assert defaults[name] != value, name


@pytest.mark.parametrize("values", KEPT_RUNS, ids=lambda v: f"{v['model']}-{v['loss']}-{v.get('params', 'tokens')}")
def test_a_resumed_run_keeps_every_kept_setting(tmp_path, values):
    out = str(tmp_path / "run")
    first = dict(values, steps=values.get("steps", 2))
    fast = ["--threads", "1", "--workers", "1"] + ([] if "lr" in values else ["--lr", "0.1"])
    train.main(fast + as_argv(first) + ["--out", out])
    ran = config(out)
    train.main(["--threads", "1", "--out", out, "--resume", "latest"])  # no setting given
    resumed = config(out)
    for name in first:
        assert resumed[name] == ran[name] == first[name], name


def test_free_settings_leave_the_step_the_same(tmp_path):
    """Every FREE setting changed at once: the tokens after two steps are the default run's (within fp32
    summation order: --rows-per-forward and checkpointing reorder sums)."""
    base = ["--model", "tiny-sd3", "--loss", "softrepa", "--batch", "3", "--steps", "2"] + FAST
    plain = train.main(base + ["--out", str(tmp_path / "plain")])["tokens"].state_dict()
    varied = train.main(base + as_argv(FREE_VALUES) + ["--out", str(tmp_path / "free")])["tokens"].state_dict()
    moved = train.main(base + ["--tau", "0.3", "--out", str(tmp_path / "kept")])["tokens"].state_dict()
    for key in plain:
        torch.testing.assert_close(varied[key], plain[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(moved[k], plain[k], rtol=1e-5, atol=1e-6) for k in plain)  # the check can fail


def test_resume_refuses_another_world_and_keeps_the_text_length(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--model", "tiny-sd3", "--loss", "dsm", "--steps", "1"] + FAST + ["--out", out])
    assert config(out)["world"] == 1 and config(out)["max_sequence_length"] is None
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    saved = json.loads(ckpt["config"])
    ckpt["config"] = json.dumps(dict(saved, world=2))
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    with pytest.raises(SystemExit, match="that run has world=2, this one 1"):
        train.main(["--random-init", "--out", out, "--resume", "latest"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--params", "lora", "--loss", "dsm", "--n-tokens", "3"], "--n-tokens does nothing in this run"),
        (["--loss", "dsm", "--gamma-pos", "2"], "--gamma-pos does nothing in this run"),
        (["--loss", "agsm", "--dweight", "2"], "--dweight does nothing in this run"),
        (["--loss", "dsm", "--gather-text"], "--gather-text does nothing in this run"),
        (["--params", "lora", "--n-tokens", "3"], "--params lora trains one set of weights, and --loss agsm"),
    ],
)
def test_a_flag_the_run_does_not_use_is_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "tiny-sd3"] + argv + ["--out", str(tmp_path / "run")])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_defaults_follow_the_authors_codes_on_the_real_families():
    sd3 = recipe.defaults("sd3", "agsm")
    assert sd3["max_sequence_length"] == 512 and sd3["ema_init"] == "draw"  # jaayeon/AGSM, softrepa/SoftREPA
    assert recipe.defaults("tiny-sd3", "agsm")["ema_init"] == "copy"  # the shapes world keeps ours
    assert recipe.defaults("sd3.5-medium", "agsm")["max_sequence_length"] == 256  # no authors' code: the pipeline's
