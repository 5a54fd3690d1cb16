"""Tiny metric models built offline and saved as the hub lays them out (the loaders' from_pretrained path):
a CLIP whose projections make the red image match "red" and the blue one "blue", and a DINO ViT."""

import json

import numpy as np
import torch

RED, BLUE = np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)
RED[..., 0], BLUE[..., 2] = 255, 255


def save_clip(folder):
    """A tiny CLIP (character vocabulary) whose projections are set so that the red image and "red",
    and the blue image and "blue", map to the same unit vector, and the two pairs are orthogonal."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per letter
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")),
    )
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, **small
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=4,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    inputs = processor(
        text=["red", "blue"], images=[Image.fromarray(RED), Image.fromarray(BLUE)], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        image_features = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output  # (2, 16)
        text_features = model.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        targets = torch.eye(4)[:, :2]  # pair j -> unit vector e_j
        model.visual_projection.weight.copy_(targets @ torch.linalg.pinv(image_features.T))
        model.text_projection.weight.copy_(targets @ torch.linalg.pinv(text_features.T))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_dino(folder):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ).save_pretrained(folder)
    return folder


def save_vqa(folder, words="How many Are there any Is the in image? Answer in one word. Yes yes No no one two 1 2"):
    """A tiny LLaVA (CLIP vision tower, Llama language model, random weights) with a processor that works
    offline: a byte-level BPE tokenizer (" yes" and "yes" are different tokens, as in Qwen's) trained here
    on `words`, CLIP's image processor and a one-turn chat template. Saved as the hub lays a model out,
    so AutoProcessor / AutoModelForImageTextToText load it from the folder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<image>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([words, words.lower()], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}
    )
    template = (
        "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",  # CLIP's class token dropped: 16 image tokens
        num_additional_image_tokens=1,
        chat_template=template,
    )
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **small),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **small
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,  # the tests set the output layer alone
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
