"""
prompt.py: vectors at the text encoder's input, in the place of words (textual inversion's place).

Textual inversion (Gal et al. 2022, eq. 2) learns the embedding v* of a new word S*: the prompt's word
embeddings, with v* at S*'s position, go through the frozen text encoder, and the gradient reaches v*
through every layer of it. Unlike the soft tokens (softtokens.py), which are prepended to the denoiser's
text stream after the encoder, such a vector changes the encoder's state of every later word (the encoder
is causal) and its pooled summary.

`at_input` is the one mechanism: a forward hook on the encoder's token-embedding table that puts a vector
in place of each occurrence of a placeholder id, the k-th occurrence in a row taking the k-th vector. The
prompts carry the placeholders as words (placed after <bos>, where textual inversion's S* sits when it
leads the prompt); rows without them (CFG's unconditional "") are left alone.

train.py --params prompt (`Prompt`): n learned vectors right after <bos>, the text encoder frozen and the
gradient through it, trained by the same step (step.py) as the tokens and LoRA, on the tiny families and on
SD1.5 / SDXL (whose pipelines read diffusers' textual-inversion files); every caption of a batch
gets them, the unconditional prompt of sampling does not (as a textual-inversion word is in the prompt
and not in the negative prompt). The shapes world's tiny encoders read them in the place of "<unk>" words
(an unknown word, which no training or evaluation prompt holds); SD1.5 / SDXL's CLIPs read them in the
place of an added token, "<prompt>". The file (prompt.safetensors) is diffusers' textual-inversion file
("emb_params"; SDXL "clip_l" and "clip_g"), so pipe.load_textual_inversion reads it, with the run's recipe
in its header.
AGSM is refused: its psi+ / psi- would be two prompts, each caption encoded under each of them and under
their EMA copies (four text-encoder passes a step, chosen per pair); that is not built.
"""

import json
from contextlib import contextmanager

import torch

import files


def placed(embeddings, ids, vectors, placeholder_id):
    """embeddings (B, L, d) of `ids` (B, L) with the k-th `placeholder_id` of each row replaced by vectors[k]
    ((n, d), shared by the rows) or vectors[b, k] ((B, n, d): one set per row)."""
    mask = ids == placeholder_id
    if not mask.any():
        return embeddings
    rank = (mask.cumsum(dim=1) - 1).clamp(min=0)  # which vector each placeholder takes
    n = vectors.shape[-2]
    if int(mask.sum(dim=1).max()) > n:
        raise ValueError(f"a prompt has {int(mask.sum(dim=1).max())} placeholders for {n} vectors")
    rank = rank.clamp(max=n - 1)
    if vectors.dim() == 2:
        chosen = vectors[rank]  # (B, L, d)
    else:
        chosen = torch.gather(vectors, 1, rank[..., None].expand(-1, -1, vectors.shape[-1]))
    return torch.where(mask[..., None], chosen.to(embeddings.dtype), embeddings)


@contextmanager
def at_input(text_encoder, vectors, placeholder_id):
    """While inside, text_encoder reads `vectors` at its placeholder positions (see `placed`)."""
    table = text_encoder.get_input_embeddings()
    handle = table.register_forward_hook(lambda module, args, out: placed(out, args[0], vectors, placeholder_id))
    try:
        yield
    finally:
        handle.remove()


class Prompt(torch.nn.Module):
    """n learned vectors (n, d) at the text encoder's input, after <bos>; `placeholder` the word the prompts
    carry in their place and `placeholder_id` its id (the tiny encoders: "<unk>"). SDXL reads two encoders:
    `vectors_2` (n, d_2) goes into its second one (CLIP-G), as diffusers' textual-inversion files hold a
    "clip_l" and a "clip_g" set."""

    def __init__(self, vectors, placeholder, placeholder_id, vectors_2=None, placeholder_id_2=None):
        super().__init__()
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())
        self.vectors_2 = None if vectors_2 is None else torch.nn.Parameter(vectors_2.detach().clone().float())
        self.placeholder, self.placeholder_id, self.placeholder_id_2 = placeholder, placeholder_id, placeholder_id_2

    def trainable(self):
        return [p for p in (self.vectors, self.vectors_2) if p is not None]

    def numel(self):
        return sum(p.numel() for p in self.trainable())

    def texts(self, captions):
        """The captions with the placeholders in front; "" (CFG's unconditional prompt) stays "" ."""
        words = " ".join([self.placeholder] * len(self.vectors))
        return [f"{words} {c}" if c else c for c in captions]

    def placed_on(self, bb, detach=False):
        """A context in which bb's text encoder(s) read the vectors at the placeholders."""
        from contextlib import ExitStack

        stack = ExitStack()
        for encoder, vectors, placeholder_id in encoders(bb, self):
            stack.enter_context(at_input(encoder, vectors.detach() if detach else vectors, placeholder_id))
        return stack

    def encode(self, bb, captions, grad=True):
        """The text kwargs of `captions` read with the vectors, the gradient reaching them through the
        frozen encoder (models.encode_prompts with grad: the encoder's own weights stay frozen)."""
        import models

        with self.placed_on(bb):
            return models.encode_prompts(bb, self.texts(captions), grad=grad)


# The hub families whose pipelines read textual-inversion files (diffusers' load_textual_inversion): one
# CLIP (SD1.5) or two (SDXL). Their tokenizers get the placeholder as an added token, and their tables a
# row for it, which the vectors then stand in for (what load_textual_inversion does with the file's vectors).
PLACEHOLDER = "<prompt>"
TEXTUAL_INVERSION_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def encoders(bb, prompt):
    """[(text encoder, vectors, placeholder id)] that read the prompt."""
    if bb.pipe is None:
        return [(bb.text_encoder, prompt.vectors, prompt.placeholder_id)]
    pairs = [(bb.pipe.text_encoder, prompt.vectors, prompt.placeholder_id)]
    if prompt.vectors_2 is not None:
        pairs.append((bb.pipe.text_encoder_2, prompt.vectors_2, prompt.placeholder_id_2))
    return pairs


def word_row(tokenizer, encoder, word, name):
    """The embedding of a one-token `word` (textual inversion's initializer token must be one token)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise SystemExit(f"--prompt-init {word!r} is {len(ids)} tokens of {name}'s tokenizer; pass a one-token word")
    return encoder.get_input_embeddings().weight[ids[0]].detach()


def add_placeholder(tokenizer, encoder):
    """The placeholder as an added token of `tokenizer` and a row of `encoder`'s table; returns its id."""
    tokenizer.add_tokens([PLACEHOLDER])
    if len(tokenizer) > encoder.get_input_embeddings().weight.shape[0]:
        encoder.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(PLACEHOLDER)


def make(bb, n, init_word, seed=0):
    """A Prompt of n copies of `init_word`'s embedding (textual inversion starts from a coarse word, Gal
    et al. sec. 4): the tiny encoders (the world's words, the placeholder "<unk>"), or SD1.5 / SDXL's CLIPs
    (the placeholder an added token). Other hub families have no textual-inversion format: refused."""
    if bb.pipe is not None:
        if bb.facts["pipeline"] not in TEXTUAL_INVERSION_PIPELINES:
            raise SystemExit(
                f"--params prompt: {bb.name} has no textual-inversion format (diffusers reads it for SD1.5 and "
                "SDXL); pass --params tokens or lora"
            )
        pipe = bb.pipe
        first = word_row(pipe.tokenizer, pipe.text_encoder, init_word, bb.name)
        placeholder_id = add_placeholder(pipe.tokenizer, pipe.text_encoder)
        second = placeholder_id_2 = None
        if bb.facts["pipeline"] == "StableDiffusionXLPipeline":
            second = word_row(pipe.tokenizer_2, pipe.text_encoder_2, init_word, bb.name)
            placeholder_id_2 = add_placeholder(pipe.tokenizer_2, pipe.text_encoder_2)
        return Prompt(
            first.expand(n, -1),
            PLACEHOLDER,
            placeholder_id,
            None if second is None else second.expand(n, -1),
            placeholder_id_2,
        ).to(bb.device)
    ids = bb.tokenize([init_word])[0]
    if int(ids[1]) == int(ids[0]) or len(init_word.split()) != 1:
        raise SystemExit(f"--prompt-init {init_word!r}: one word of the model's vocabulary")
    table = bb.text_encoder.get_input_embeddings().weight
    unk = int(bb.tokenize(["<unk>"])[0][1])
    if int(ids[1]) == unk:
        raise SystemExit(f"--prompt-init {init_word!r} is not a word of {bb.name}'s vocabulary")
    return Prompt(table[int(ids[1])].detach().expand(n, -1), "<unk>", unk).to(table.device)


class PromptHandle:
    """trained.attach's handle for a prompt file: while attached, bb's tokenizer puts the placeholders in
    front of every non-empty prompt and the encoder reads the vectors there; rows(...) is every row."""

    def __init__(self, bb, prompt):
        self.bb, self.tokenize = bb, bb.tokenize
        bb.tokenize = lambda prompts: self.tokenize(prompt.texts(list(prompts)))
        self.hook = prompt.placed_on(bb, detach=True)
        self.hook.__enter__()

    @contextmanager
    def rows(self, choice):
        yield self

    def remove(self):
        self.bb.tokenize = self.tokenize
        self.hook.__exit__(None, None, None)


def save(path, prompt, **meta):
    """prompt.safetensors in diffusers' textual-inversion layout -- "emb_params" (one encoder), or "clip_l"
    and "clip_g" (SDXL) -- so that pipe.load_textual_inversion reads it, with `meta` in its header."""
    from safetensors.torch import save_file

    header = {k: json.dumps(v) for k, v in {"params": "prompt", "placeholder": prompt.placeholder, **meta}.items()}

    def plain(p):
        return p.detach().float().cpu().contiguous().clone()

    if prompt.vectors_2 is None:
        tensors = {"emb_params": plain(prompt.vectors)}
    else:
        tensors = {"clip_l": plain(prompt.vectors), "clip_g": plain(prompt.vectors_2)}
    files.write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def is_prompt_file(path):
    """A file of `save` (or a diffusers textual-inversion file): files.describe reads its header and keys."""
    return files.describe(path)[0] == "prompt"


def read(path, name):
    """(Prompt, info) of a prompt file for family `name` (placeholder id resolved at attach)."""
    header, state = files.read_safetensors(path, "a prompt file (train.py --params prompt)")
    model = json.loads(header.get("model", "null"))
    if model not in (None, name):
        raise SystemExit(f"{path} holds a prompt for {model}, not {name}: pass --model {model}")
    if "clip_l" in state:
        raise SystemExit(f"{path} is an SDXL textual-inversion file: load it with pipe.load_textual_inversion")
    vectors = state.get("emb_params")
    if vectors is None or vectors.dim() != 2 or not torch.isfinite(vectors).all():
        raise SystemExit(f"{path}: no finite (n, d) 'emb_params' in it; expected a prompt file of train.py")
    return Prompt(vectors, json.loads(header.get("placeholder", '"<unk>"')), None), dict(
        token_set="prompt", blocks=None, path=path
    )


def attach(bb, prompt):
    """The prompt on bb (its tokenizer and encoder input); returns the PromptHandle."""
    if bb.tokenize is None:
        raise SystemExit(
            "sampling with a prompt file here takes the shapes world's tiny models; on SD1.5 / SDXL load it with "
            "pipe.load_textual_inversion(path, token=...) and put the token in the prompt"
        )
    width = bb.text_encoder.get_input_embeddings().weight.shape[1]
    if prompt.vectors.shape[1] != width:
        raise SystemExit(
            f"this prompt's vectors are {prompt.vectors.shape[1]} wide, {bb.name}'s encoder reads {width}"
        )
    prompt.placeholder_id = int(bb.tokenize([prompt.placeholder])[0][1])
    prompt.to(bb.device)
    return PromptHandle(bb, prompt)
