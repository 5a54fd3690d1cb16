"""
counting.py: the counters of SoftREPA's counting loss (appendix D) on the real families.

The loss itself is in losses.py (prompt_count, one_step_x0, count_row_losses) and the step adds it
(step.py); what it needs from outside is a differentiable counter: `soft_count(images, nouns)`, the
expected number of each asked object in each image. The authors used YOLOv8, which cannot be loaded
here; any transformers object detector saved in a local folder can (DetectorCounter). The shapes world
brings its own counter (shapes/checker.py, ShapesCounter); train.py chooses between the two.
"""

import json
import os

import torch

import files
import losses


class DetectorCounter(torch.nn.Module):
    """A transformers object detector (DETR, Conditional / Deformable DETR, YOLOS, RT-DETR ...) saved in
    a local folder, as a differentiable counter: the soft count of class c in an image is the sum over
    the detector's queries of p(query is a c) -- softmax over the classes and "no object" for the DETR
    family, a sigmoid where the head has no such class (RT-DETR). Its mean and std normalise the input
    as its image processor does; the image keeps its own size (the DETR family takes any)."""

    def __init__(self, folder):
        super().__init__()
        from transformers import AutoModelForObjectDetection

        self.detector = AutoModelForObjectDetection.from_pretrained(folder, local_files_only=True).eval()
        self.detector.requires_grad_(False)
        processor = os.path.join(folder, "preprocessor_config.json")
        config = json.load(open(processor)) if os.path.exists(processor) else {}
        self.register_buffer("mean", torch.tensor(config.get("image_mean", [0.485, 0.456, 0.406])).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.get("image_std", [0.229, 0.224, 0.225])).view(1, 3, 1, 1))
        self.labels = {losses.singular(v.lower()): int(k) for k, v in self.detector.config.id2label.items()}

    def soft_count(self, images, nouns):
        """images (B, 3, H, W) in [-1, 1], nouns (B,) -> (B,) expected counts; NaN for an unknown noun."""
        pixels = ((images.float() + 1) / 2 - self.mean) / self.std
        logits = self.detector(pixel_values=pixels).logits  # (B, queries, classes [+ 1])
        probs = (
            torch.softmax(logits, -1)
            if logits.shape[-1] == self.detector.config.num_labels + 1
            else torch.sigmoid(logits)
        )
        columns = torch.tensor([self.labels.get(n, -1) for n in nouns], device=images.device)
        counts = probs.gather(2, columns.clamp(min=0).view(-1, 1, 1).expand(-1, probs.shape[1], 1)).sum((1, 2))
        return torch.where(columns >= 0, counts, torch.full_like(counts, float("nan")))


def open_detector(folder, device):
    """--counter FOLDER: a transformers object detector saved with save_pretrained, as a DetectorCounter;
    one-line errors for no folder and for a folder holding something else."""
    if folder is None:
        raise SystemExit(
            "--count-weight needs --counter FOLDER: a transformers object detector saved with "
            "save_pretrained (e.g. a DETR), read from disk"
        )
    # its config names a detector class (files.describe), checked before transformers loads it
    files.check_kind(folder, {"detector"}, "--counter", "a transformers object-detector folder (e.g. a DETR's)")
    return DetectorCounter(folder).to(device)
