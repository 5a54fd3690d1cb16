"""
files.py: every file read from the user, and every file written, each class of them handled in one place; and
what a person meets at a terminal (Ctrl-C, a device that gives out).

Reading. A file or folder a user names (--tokens, --resume, --pretrained, --counter, --data CACHE, --bench,
--runs, --prompts) is read by one function here, which turns any parse, shape, key or config error into one
line: the path, and what was expected there. `describe(path)` says what a path holds (a token file, a
checkpoint, an encoding cache of sd3, a run folder ...) from its header or config alone, so that a file of the
wrong kind is named for what it is (`check_kind`, `refuse`). A folder of the wrong family is refused from its
config before any weights load; a cache with a shard missing is refused before training starts.

Writing. Every output goes through `write(path, write_to)`: `write_to(tmp)` writes a temporary file beside
`path`, which is flushed to disk (fsync) and renamed over `path` (os.replace), so a reader never sees half a
file and a crash keeps the last good one. A full disk or a read-only place ends in one line that names the
path and the cause, whatever the library writing says (torch.save's RuntimeError names no cause: WRITE_FAULTS);
the temporary file is removed and the previous file is left as it was.
`check_writable(folder)` is what a script calls first, before any heavy work, so that a place it cannot write
fails in a second, not after an hour. The encoding cache, whose shards are written row by row, stages its
files with `scratch` inside `staging()` and renames them all at the end (`commit`), so an interrupted cache
leaves the previous one whole.

At a terminal. Every script's __main__ is `script(main)`: Ctrl-C, SIGTERM, a full disk met outside the writer,
out of memory and a failing GPU end in one line saying what is kept (a run names its last checkpoint with
`on_interrupt`) and the command that goes on from it.

Sampling. `check_finite(latents, what)` is the last check before latents become images: a NaN or inf (from
--cfg, the tokens or the model) ends in one line and no image is saved.
"""

import errno
import json
import os
import sys
import tempfile
from contextlib import contextmanager

import torch

# -----------------------------------------------------------------------------
# Reading


def read_json(path, expected, kind=dict, nonempty=False):
    """The JSON value in `path`, which must be a `kind` (dict or list), and not empty with nonempty=True."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {expected}")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"{path}: not readable JSON ({first_line(e)}); expected {expected}") from None
    if not isinstance(value, kind):
        raise SystemExit(f"{path}: holds a JSON {type(value).__name__}; expected {expected}")
    if nonempty and not value:
        raise SystemExit(f"{path}: is empty; expected {expected}")
    return value


def read_json_lines(path, expected):
    """[(line number, object)] of a JSON-lines file (records.jsonl, a --data .jsonl): each line an object."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected JSON lines, each {expected}")
    found = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise SystemExit(f"{path}:{n}: not JSON ({first_line(e)}); each line is {expected}") from None
                if not isinstance(item, dict):
                    raise SystemExit(f"{path}:{n}: not a JSON object; each line is {expected}")
                found.append((n, item))
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(
            f"{path}: not readable text ({first_line(e)}); expected JSON lines, each {expected}"
        ) from None
    return found


def read_csv(path, expected, columns):
    """The rows (dicts) of a CSV whose header holds `columns`: a file of another kind, or one lacking a column,
    is one line (what it is, or which columns it lacks), not a KeyError in the middle of a table."""
    import csv

    if not os.path.isfile(path):
        raise SystemExit(
            f"{path}: {describe(path)[1] if os.path.exists(path) else 'no such file'}; expected {expected}"
        )
    try:
        with open(path, newline="") as f:
            table = csv.DictReader(f)
            rows, header = list(table), table.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error):
        raise SystemExit(f"{path}: is {describe(path)[1]}; expected {expected}") from None
    lacking = [c for c in columns if c not in header]
    if lacking:
        raise SystemExit(f"{path}: has no column {', '.join(lacking)}; expected {expected}")
    return rows


def read_prompt_file(path):
    """--prompts: [{"prompt", "spec" (if any)}] from a text file (a prompt a line) or JSON lines with "prompt"."""
    if not os.path.isfile(path):
        raise refuse("--prompts", path, "a text file (a prompt a line) or JSON lines")
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError):  # a token file, an image: say what it is
        raise SystemExit(f"{path}: is {describe(path)[1]}; expected a text file, a prompt a line") from None
    if not lines:
        raise SystemExit(f'{path}: has no prompts; expected a prompt a line, or JSON lines with a "prompt"')
    if not lines[0].startswith("{"):
        return [{"prompt": line} for line in lines]
    items = []
    for n, item in read_json_lines(path, 'an object with a "prompt" string'):
        if not isinstance(item.get("prompt"), str):
            raise SystemExit(f'{path}:{n}: has no "prompt" string; each line is an object with a "prompt" string')
        items.append({k: item[k] for k in ("prompt", "spec") if k in item})
    return items


def read_safetensors(path, expected, tensors=True, json_metadata=False):
    """(metadata, {key: tensor}) of a safetensors file -- (metadata, [keys]) with tensors=False, which reads
    the header alone; json_metadata: each metadata value decoded from JSON (softtokens.save writes them so).
    Anything that is not such a file (truncated, random bytes, a .pt) is one line."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {expected}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            content = {k: f.get_tensor(k) for k in f.keys()} if tensors else list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: not a readable safetensors file ({first_line(e)}); expected {expected}") from None
    if json_metadata:
        try:
            meta = {k: json.loads(v) for k, v in meta.items()}
        except ValueError as e:
            raise SystemExit(f"{path}: its metadata is not JSON ({first_line(e)}); expected {expected}") from None
    return meta, content


def load_weights(module, path, what):
    """Load a safetensors state dict into `module`, after checking that every key and shape fits: another
    model's file is one line, not argparse-sized pages of state-dict keys."""
    _, state = read_safetensors(path, f"the weights of {what}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    misshapen = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or misshapen:
        first = (
            f"{misshapen[0]} is {tuple(state[misshapen[0]].shape)}, not {tuple(own[misshapen[0]].shape)}"
            if misshapen
            else f"{(missing or extra)[0]} is {'missing' if missing else 'not in the model'}"
        )
        raise SystemExit(
            f"{path}: its tensors do not fit {what} ({len(missing)} missing, {len(extra)} unexpected, "
            f"{len(misshapen)} of another shape; {first}); expected the weights of {what}"
        )
    module.load_state_dict(state)


def read_checkpoint(path, flag, expected, allowed=(), keys=()):
    """torch.load(weights_only=True): a pickle that asks for anything but tensors (and the classes in
    `allowed`) is refused without running it; a truncated or foreign file is one line, and so is a file of
    another kind (describe), or a dict without `keys` (another script's checkpoint)."""
    import pickle
    import re

    if not os.path.isfile(path):
        raise refuse(flag, path, expected)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if asked:  # weights_only refused a class (e.g. posix.system): code would have run
            raise SystemExit(
                f"{flag} {path}: refused, its pickle asks for {asked.group(1)}, which is not a tensor, and "
                f"nothing in it was run; expected {expected}"
            ) from None
        raise refuse_unreadable(flag, path, expected, e) from None
    except Exception as e:  # truncated, random bytes, not a zip: the unpickler trips on anything (IndexError...)
        raise refuse_unreadable(flag, path, expected, e) from None
    if keys and not (isinstance(state, dict) and all(k in state for k in keys)):
        raise refuse(flag, path, expected)
    return state


def refuse_unreadable(flag, path, expected, e):
    """A file torch.load cannot read: what it is, if it is a file of another kind (a token file, an image), or
    else that it is no readable checkpoint (cut short, random bytes)."""
    kind, words = describe(path)
    if kind in ("tokens", "lora", "counter", "weights", "image", "text", "json", "jsonl"):
        return SystemExit(f"{flag} {path}: is {words}; expected {expected}")
    return SystemExit(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}); expected {expected}")


def check_pretrained(folder, name, pipeline, denoiser_class, hub):
    """--pretrained: a local copy of the hub repo of family `name`, checked from its configs before any
    weights load: model_index.json names the family's pipeline, and the denoiser's config its class."""
    expected = f"a local copy of {hub} (model_index.json and its subfolders) for --model {name}"
    if not os.path.isfile(os.path.join(folder, "model_index.json")):  # a file, a cache, a run, a detector ...
        raise refuse("--pretrained", folder, expected)
    index = read_json(os.path.join(folder, "model_index.json"), expected)
    if index.get("_class_name") != pipeline:
        raise SystemExit(
            f"--pretrained {folder}: holds a {index.get('_class_name')}, not the {pipeline} of {name}; pass "
            f"the --model it was saved for, or {expected}"
        )
    part = "transformer" if "Transformer" in denoiser_class else "unet"
    config = read_json(os.path.join(folder, part, "config.json"), f"the {denoiser_class} config of {expected}")
    if config.get("_class_name") != denoiser_class:
        raise SystemExit(
            f"--pretrained {folder}: its {part} is a {config.get('_class_name')}, not the {denoiser_class} of "
            f"{name}; expected {expected}"
        )


CACHE_KEYS = ("model", "size", "store", "captions_per_image", "fields", "shards")


def read_cache_meta(folder, bytes_per_number):
    """An encoding cache (python data.py cache): cache.json, and every shard's files present and of the
    size it declares (a deleted or cut shard fails here, before training, not at its first batch)."""
    expected = "an encoding cache written by `python data.py cache`"
    meta = read_json(os.path.join(folder, "cache.json"), expected)
    if any(k not in meta for k in CACHE_KEYS):
        raise SystemExit(f"{folder}/cache.json: lacks {[k for k in CACHE_KEYS if k not in meta]}; expected {expected}")
    try:
        width = bytes_per_number(meta["store"])
    except KeyError:
        raise SystemExit(
            f"{folder}/cache.json: store {meta['store']!r} is none of this project's; expected {expected}"
        ) from None
    for shard in meta["shards"]:
        header = read_json(os.path.join(folder, f"{shard['name']}.json"), f"a shard header of {expected}")
        if len(header.get("captions", ())) != shard["count"]:
            raise SystemExit(
                f"{folder}/{shard['name']}.json: holds {len(header.get('captions', ()))} captions for "
                f"{shard['count']} images; expected {expected} (rebuild it)"
            )
        for field, shape in meta["fields"].items():
            path = os.path.join(folder, f"{shard['name']}.{field}.bin")
            size = shard["count"] * width
            for n in shape:
                size *= n
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                found = "missing" if not os.path.isfile(path) else f"{os.path.getsize(path)} bytes, not {size}"
                raise SystemExit(f"{path}: {found}; expected a shard of {expected} (rebuild the cache)")
    return meta


def read_benchmark_index(path, kind, keys):
    """A benchmark folder's index (PIE-Bench's mapping_file.json: an object; DIV2K's prompts_editing.json: a
    list): not empty, and every entry an object holding `keys`."""
    expected = f"a non-empty JSON {'object' if kind is dict else 'list'} of entries with {', '.join(keys)}"
    index = read_json(path, expected, kind, nonempty=True)
    for key, entry in index.items() if kind is dict else enumerate(index):
        lacking = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise SystemExit(f"{path}: entry {key!r} lacks {', '.join(lacking)}; expected {expected}")
    return index


# -----------------------------------------------------------------------------
# What a file or folder is. Given a file of the wrong kind (a token file as --counter, a checkpoint as --tokens,
# an SD3 cache for sd1.5), a reader's one line says what the path holds and what was expected there, read from
# its header, config or names alone: nothing of it runs, and no weights load.

SHAPES_COUNTER_KEYS = {"features.0.weight", "head.weight"}  # shapes/checker.py's ShapesCounter (the shipped file)


def describe(path):
    """(kind, words): what `path` is -- kind one of missing, tokens, lora, prompt, whole, counter, weights, checkpoint,
    pretrain-checkpoint, pickle, cache, pipeline, detector, transformers, diffusers-model, released-tokens, run,
    tiny-weights, samples, benchmark, coco, images, folder, json, jsonl, image, text, binary -- and `words`."""
    if not os.path.exists(path):
        return "missing", "no such file or folder"
    if os.path.isdir(path):
        return describe_folder(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "binary", "an empty file"
    if head[8:9] == b"{" and len(head) > 8:  # safetensors: an 8-byte header length, then the JSON header
        return describe_safetensors(path)
    if head.startswith(b"PK") or head[:1] == b"\x80":  # torch.save's zip, or an old-style pickle
        return describe_pickle(path)
    try:
        from PIL import Image

        with Image.open(path) as im:
            return "image", f"a {im.format} image ({im.size[0]}x{im.size[1]})"
    except Exception:  # not an image: PIL's ways to say so are many
        pass
    try:
        text = head.decode()
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:  # valid UTF-8 may hold NUL bytes; no text does
        return "binary", f"a binary file of {os.path.getsize(path)} bytes"
    if text.lstrip().startswith(("{", "[")):
        try:
            with open(path) as f:
                value = json.load(f)
            if isinstance(value, dict):
                return "json", f"a JSON object (keys {', '.join(list(value)[:4])}{', ...' if len(value) > 4 else ''})"
            return "json", f"a JSON {type(value).__name__} of {len(value) if hasattr(value, '__len__') else 1}"
        except (ValueError, UnicodeDecodeError):
            if text.lstrip().startswith("{"):
                return "jsonl", "a JSON-lines file"
    return "text", "a text file"


def describe_safetensors(path):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta, keys = dict(f.metadata() or {}), set(f.keys())
    except Exception:  # a cut or foreign header: safetensors' errors are many
        return "binary", "a safetensors file that cannot be read (cut short or damaged)"
    try:
        model = json.loads(meta.get("model", "null"))
    except ValueError:
        model = meta.get("model")
    of = f" for {model}" if model else ""
    if "sets" in meta:
        return "tokens", f"a soft-token file{of} (train.py's tokens.safetensors)"
    if meta.get("params") == json.dumps("all"):
        return "whole", f"a whole-denoiser file{of} (train.py --params all)"
    if meta.get("params") == json.dumps("prompt") or "emb_params" in keys or {"clip_l", "clip_g"} <= keys:
        return "prompt", f"a learned-prompt (textual-inversion) file{of}"
    if any(".lora_A." in k or ".lora_B." in k or "lora_down" in k for k in keys):
        return "lora", f"a LoRA file{of}"
    if SHAPES_COUNTER_KEYS <= keys:
        return "counter", "a shapes counter's weights (python -m shapes.counter)"
    return "weights", f"model weights ({len(keys)} tensors: {', '.join(sorted(keys)[:2])}, ...)"


def describe_pickle(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no code runs: tensors and dicts only
    except Exception:  # a class it would have to build, a cut file: what it holds is not for us anyway
        return "pickle", "a PyTorch pickle that is not a checkpoint of this project"
    if isinstance(state, dict) and "config" in state and "tokens" in state:
        try:
            config = json.loads(state["config"])
        except (TypeError, ValueError):
            config = {}
        return "checkpoint", f"a checkpoint of train.py ({config.get('model')}, step {int(state.get('step', -1))})"
    if isinstance(state, dict) and "opt" in state and "first_step" in state:
        return "pretrain-checkpoint", "a checkpoint of shapes.pretrain"
    if torch.is_tensor(state):
        return "pickle", f"a saved tensor of shape {tuple(state.shape)}"
    return "pickle", f"a PyTorch file holding a {type(state).__name__}"


def describe_folder(folder):
    names = sorted(os.listdir(folder))
    has = lambda name: name in names  # noqa: E731
    if has("cache.json"):
        try:
            meta = json.load(open(os.path.join(folder, "cache.json")))
            return "cache", f"an encoding cache of {meta.get('model')} at {meta.get('size')} px (data.py cache)"
        except (OSError, ValueError):
            return "cache", "an encoding cache whose cache.json cannot be read"
    if has("model_index.json"):
        try:
            index = json.load(open(os.path.join(folder, "model_index.json")))
        except (OSError, ValueError):
            index = {}
        return "pipeline", f"a diffusers pipeline folder ({index.get('_class_name')})"
    if has("config.json") and not has("log.csv"):
        try:
            config = json.load(open(os.path.join(folder, "config.json")))
        except (OSError, ValueError):
            config = {}
        if "model_type" in config:
            from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES as DETECTORS

            kind = "detector" if config["model_type"] in DETECTORS else "transformers"
            return kind, f"a transformers {config['model_type']} model folder"
        if "_class_name" in config:
            return "diffusers-model", f"a diffusers {config['_class_name']} folder"
    if has("dc_tokens.pth") or has("soft_tokens.pth"):
        return "released-tokens", f"a folder of the {'SoftREPA' if has('dc_tokens.pth') else 'AGSM'} authors' tokens"
    if has("ckpt.pt") or (has("config.json") and has("log.csv")):
        trained = [n for n in ("tokens.safetensors", "lora.safetensors") if has(n)]
        holding = f", holding {trained[0]}" if trained else ""
        return "run", f"a run folder of train.py{holding}"
    if has("records.jsonl"):
        return "samples", "a folder of sampled images (sample.py's records.jsonl)"
    if has("mapping_file.json") or has("prompts_editing.json"):
        return "benchmark", "an editing benchmark folder"
    if has("annotations"):
        return "coco", "a COCO folder"
    if has("denoiser.safetensors"):
        return "tiny-weights", "a shapes-world backbone's weights folder (shapes.pretrain's --out)"
    if any(n.endswith(".safetensors") for n in names):
        return "folder", f"a folder of weights ({', '.join(n for n in names if n.endswith('.safetensors'))})"
    images = [n for n in names if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp"))]
    if images:
        return "images", f"a folder of {len(images)} images"
    if not names:
        return "folder", "an empty folder"
    return "folder", f"a folder of {len(names)} entries ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def refuse(flag, path, expected):
    """The one line for a path of the wrong kind: what it is, and what was expected there."""
    return SystemExit(
        f"{flag} {path}: {'is ' if os.path.exists(path) else ''}{describe(path)[1]}; expected {expected}"
    )


def check_kind(path, kinds, flag, expected):
    """`path` must be one of `kinds` (of describe); any other is one line (refuse). Returns its kind."""
    kind = describe(path)[0]
    if kind not in kinds:
        raise refuse(flag, path, expected)
    return kind


def check_trained(path, flag="--tokens"):
    """--tokens (or `flag`): a file train.py wrote (soft tokens, LoRA adapters, a learned prompt or a whole
    denoiser), or the SoftREPA authors' released tokens."""
    expected = (
        "a token, LoRA, prompt or whole-denoiser file written by train.py, or a folder of the SoftREPA authors' "
        "released tokens"
    )
    return check_kind(path, {"tokens", "lora", "prompt", "whole", "released-tokens"}, flag, expected)


def first_line(e):
    """The first line of an exception's message (some libraries' run to pages)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# -----------------------------------------------------------------------------
# Writing


def check_writable(folder, flag="--out"):
    """Create `folder` and a scratch file in it: a read-only or invalid place fails before the work."""
    if os.path.exists(folder) and not os.path.isdir(folder):  # a token file, a checkpoint: say what it is
        raise refuse(flag, folder, "a folder to write to (it is made if missing)")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SystemExit(
            f"{flag} {folder}: cannot write there ({e.strerror or type(e).__name__}); pass a folder you can write to"
        ) from None


def temporary(path):
    """The temporary file beside `path` that its write goes through."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp")


# What each library raises when the place it writes to fails: Python, PIL and matplotlib an OSError (ENOSPC on a
# full disk, EROFS on a read-only one); safetensors a SafetensorError "Error while serializing: I/O error: No space
# left on device (os error 28)"; torch.save a RuntimeError that names no cause at all, "basic_ios::clear: iostream
# error" or "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598" (measured on a full tmpfs,
# tests/method/test_full_disk.py). An exception that says none of these is a bug of the caller, not of the place.
WRITE_FAULTS = ("iostream error", "inline_container", "file write failed", "i/o error", "os error", "no space left")


def place_fault(e):
    """Whether exception `e`, raised while writing a file, is the place's fault rather than the caller's."""
    return isinstance(e, OSError) or any(marker in str(e).lower() for marker in WRITE_FAULTS)


def disk_full(folder):
    """Whether the filesystem of `folder` has (almost) no room left -- under 1 MiB, or a twentieth of a small one:
    what a write error that names no cause (torch.save's) means when it is so. Root may write into the blocks
    reserved for it; others may not."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return free < min(2**20, st.f_blocks * st.f_frsize / 20)


def write_failed(path, e):
    """The one line of a write that failed: the path, the cause, and that nothing was lost."""
    if isinstance(e, OSError):
        cause = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
    elif disk_full(os.path.dirname(os.path.abspath(path))):  # torch.save's RuntimeError names no cause
        cause = "the disk is full"
    else:
        cause = first_line(e)
    if ON_INTERRUPT.get("kept") and ON_INTERRUPT.get("go_on"):  # a run that can go on: say how
        go_on = f"free space, then go on with: {command_to_go_on(ON_INTERRUPT['go_on'])}"
        return SystemExit(f"cannot write {path} ({cause}); {ON_INTERRUPT['kept']} is kept: {go_on}")
    return SystemExit(
        f"cannot write {path} ({cause}); the last good copy, if any, is kept: free space or write elsewhere"
    )


def write(path, write_to):
    """The one way a file is written: write_to(tmp) fills a temporary file beside `path`, which is then
    synced and renamed over `path`. On a full disk or a read-only place: one line, `path` as it was, and
    no temporary file left behind (nor after Ctrl-C: the temporary file goes whatever stops the write)."""
    tmp = temporary(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_to(tmp)
        commit([(tmp, path)])
    except Exception as e:  # OSError, SafetensorError, torch.save's RuntimeError: see WRITE_FAULTS
        if not place_fault(e):
            raise  # a bug of the caller, not of the place
        raise write_failed(path, e) from None
    finally:
        discard([tmp])  # gone already after a commit
    return path


def write_json(path, value, indent=1):
    return write(path, lambda tmp: dump_json(tmp, value, indent))


def write_text(path, text):
    def write_to(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return write(path, write_to)


def write_csv(path, columns, rows):
    """A CSV with a header of `columns` and a row per dict of `rows` (keys beyond the columns ignored)."""
    import csv

    def write_to(tmp):
        with open(tmp, "w", newline="") as f:
            table = csv.DictWriter(f, columns, extrasaction="ignore")
            table.writeheader()
            table.writerows(rows)

    return write(path, write_to)


def save_image(image, path):
    """A PIL image, in the format of `path`'s extension (the temporary name has none)."""
    from PIL import Image

    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    return write(path, lambda tmp: image.save(tmp, format=fmt))


def dump_json(tmp, value, indent):
    with open(tmp, "w") as f:
        json.dump(value, f, indent=indent)


def scratch(path, nbytes, staged):
    """A temporary file beside `path`, `nbytes` long and its blocks reserved now (a full disk fails here,
    as one line, not later as a SIGBUS in a memory map), added to `staged` [(temporary, path)] for commit.
    A failure removes every temporary file staged so far: the files they were to replace stay as they were."""
    tmp = temporary(path)
    staged.append((tmp, path))
    try:
        with open(tmp, "wb") as f:
            if nbytes:
                os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        discard([t for t, _ in staged])
        raise write_failed(path, e) from None
    return tmp


@contextmanager
def staging():
    """with staging() as staged: ... -- a write of many files (the encoding cache's shards), each staged with
    `scratch(path, nbytes, staged)` and renamed into place at the end with `commit(staged)`. Whatever stops it
    first -- a full disk, Ctrl-C, a bug -- removes every temporary file staged so far, and the files they were to
    replace stay as they were; the place's faults end in one line (write_failed)."""
    staged = []
    try:
        yield staged
    except Exception as e:
        if not place_fault(e):
            raise
        paths = dict(staged)  # an OSError names the temporary file; the line names the file it was to become
        failed = paths.get(getattr(e, "filename", None)) or (staged[-1][1] if staged else "the staged files")
        raise write_failed(failed, e) from None
    finally:
        discard([tmp for tmp, _ in staged])  # none left after a commit


def commit(pairs):
    """Sync every (temporary, path) to disk, then rename each over its path, in order."""
    for tmp, _ in pairs:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    for tmp, path in pairs:
        os.replace(tmp, path)


def discard(temporaries):
    for tmp in temporaries:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# A person at a terminal. Ctrl-C, or a device that gives out (out of memory, a CUDA error), gets what bad input
# gets: one line saying what is kept and how to go on, not a traceback. Every script's __main__ is
# `files.script(main)`; a script that keeps a resumable state says so with `on_interrupt` as it writes it.

ON_INTERRUPT = {}  # "kept": what is whole on disk now, "go_on": the flags that continue from it


def on_interrupt(kept, go_on=None):
    """From now on, a stop says that `kept` (e.g. "the checkpoint runs/x/ckpt.pt at step 4") is whole, and how to
    go on: the command as it was typed with the flags `go_on` put in, flag and value (["--resume", "latest"]; a
    switch's value is None)."""
    ON_INTERRUPT.update(kept=kept, go_on=go_on)


def command_to_go_on(go_on, argv=None):
    """The command line that continues: this script's own, each flag of `go_on` set to its value (replacing the
    value typed, if any). `python -m shapes.pretrain` for a module run with -m."""
    import shlex

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, value in zip(go_on[::2], go_on[1::2]):  # value None: a switch (pretrain's --resume)
        while flag in argv:
            i = argv.index(flag)
            del argv[i : i + (1 if value is None else 2)]
        argv += [flag] if value is None else [flag, value]
    program = ["-m", spec.name] if spec is not None and spec.name != "__main__" else [sys.argv[0]]
    prefix = "torchrun --nproc_per_node=<ranks>" if "LOCAL_RANK" in os.environ else "python"
    return f"{prefix} {shlex.join(program + argv)}"


def stopped_line(what):
    """The one line of a stop: what stopped it, what is kept, how to go on."""
    if ON_INTERRUPT.get("kept") and ON_INTERRUPT.get("go_on"):
        return f"{what}: {ON_INTERRUPT['kept']} is kept; go on with: {command_to_go_on(ON_INTERRUPT['go_on'])}"
    if ON_INTERRUPT.get("kept"):
        return f"{what}: {ON_INTERRUPT['kept']} is kept"
    return f"{what}: no file was left half-written (each is written whole or not at all); run the command again"


def device_fault(e):
    """The one line of a device that gave out, or None if `e` is no such fault (then it is a bug: a traceback)."""
    import re

    text = str(e)
    if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        where = "the GPU" if isinstance(e, torch.OutOfMemoryError) or "CUDA" in text else "this machine"
        asked = re.search(r"allocate (\d+) bytes", text)  # the CPU allocator's words; CUDA's say MiB / GiB
        what = f"a tensor of {int(asked.group(1)) / 2**30:.3g} GiB" if asked else first_line(e)[:160]
        return f"out of memory on {where} ({what}): lower --batch (train.py: or --rows-per-forward)"
    if text.startswith("CUDA error") or "CUDA driver" in text or "not compiled with CUDA" in text:
        return f"the GPU failed ({first_line(e)[:160]})"
    return None


class Terminated(BaseException):
    """SIGTERM (kill, a scheduler's preemption, gpu_jobs' deadline), raised where the script is, as Ctrl-C is."""


def terminate(signum, frame):
    raise Terminated


def script(main):
    """A script's __main__ block: main() with Ctrl-C, SIGTERM and a failing device ending in one
    line and a non-zero exit (128 + the signal's number, as a shell reports it), the files written so far kept
    (files.write's temporary file goes whatever stops it)."""
    import signal

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{stopped_line('interrupted (Ctrl-C)')}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Terminated:
        print(f"\n{stopped_line('stopped (SIGTERM)')}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except (RuntimeError, AssertionError) as e:
        line = device_fault(e)
        if line is None:
            raise
        raise SystemExit(stopped_line(line)) from None
    except OSError as e:  # a write outside files.write (a log appended row by row) on a full or read-only disk
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        cause = "the disk is full" if e.errno != errno.EROFS else e.strerror
        raise SystemExit(stopped_line(f"cannot write {e.filename or 'a log'} ({cause})")) from None


# -----------------------------------------------------------------------------
# Sampling


def check_finite(latents, what):
    """The last check before latents are decoded and saved: NaN or inf is one line, and no image."""
    if not torch.isfinite(latents).all():
        raise SystemExit(
            f"{what}: the sampled latents hold NaN or inf, so no image was saved; lower --cfg, check the "
            f"tokens (a diverged run's), or sample in --precision fp32"
        )
