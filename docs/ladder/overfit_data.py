"""The overfit check's specs and training images (docs/ladder/README.md).

    python docs/ladder/overfit_data.py --select docs/ladder/overfit-specs.jsonl   # choose the 10 specs
    python docs/ladder/overfit_data.py docs/ladder/overfit-specs.jsonl runs/ladder/overfit-data   # render

The rule: the 10 distinct colour-attribution texts of the dev set with the lowest base score in the dev
protocol of docs/results/dev-layers1.json (dev seeds 1,000,000 + 4i + k, so not the seeds 0..15 they are
scored on afterwards: no selection on the scoring noise), ties in file order. The training images: 40
renders of each spec (random placement and size, shapes.render), caption = the prompt, as PNG + .txt.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import shapes  # noqa: E402


def select(out, n=10):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    d = json.load(open(os.path.join(root, "docs/results/dev-layers1.json")))
    base = d["per_prompt"]["base"]["color_attr"]["color_attr"]
    records = [r for r in shapes.load_dev_set() if r["spec"]["category"] == "color_attr"]
    assert len(records) == len(base)
    chosen, seen = [], set()
    for i in sorted(range(len(base)), key=lambda i: (base[i], i)):
        if records[i]["prompt"] not in seen:
            seen.add(records[i]["prompt"])
            chosen.append(dict(prompt=records[i]["prompt"], spec=records[i]["spec"], dev_base=base[i]))
        if len(chosen) == n:
            break
    with open(out, "w") as f:
        for r in chosen:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {out}: " + "; ".join(f"{r['prompt']} ({r['dev_base']})" for r in chosen))


def render(specs_path, folder, per_spec=40, seed=0):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    records = [json.loads(line) for line in open(specs_path)]
    for j, r in enumerate(records):
        assert shapes.caption(r["spec"]) == r["prompt"], (shapes.caption(r["spec"]), r["prompt"])
        for k in range(per_spec):
            rng = np.random.default_rng([seed, j, k])
            image = shapes.render(r["spec"], 32, rng)
            stem = os.path.join(folder, f"{j:02d}-{k:03d}")
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(stem + ".png")
            with open(stem + ".txt", "w") as f:
                f.write(r["prompt"] + "\n")
    print(f"wrote {len(records) * per_spec} images to {folder}")


if __name__ == "__main__":
    if sys.argv[1] == "--select":
        select(sys.argv[2])
    else:
        render(sys.argv[1], sys.argv[2])
