"""Tiny random safety classifiers saved as real transformers folders (no download needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_nsfw_classifier(folder: Path, verdict: str | None = None) -> Path:
    """A ViT image classifier with labels "normal"/"nsfw", like `Falconsai/nsfw_image_detection`.

    `verdict` ("nsfw" or "normal") forces the answer through the classifier's bias.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    labels = {0: "normal", 1: "nsfw"}
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    if verdict is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([10.0, -10.0] if verdict == "normal" else [-10.0, 10.0]))
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_clip(folder: Path) -> Path:
    """A CLIP model (text + vision towers) with a character-level tokenizer, for zero-shot checks."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars)])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    end = vocab["<|endoftext|>"]
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": end,
        "pad_token_id": end,
    }
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32}
    vision.update(num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
