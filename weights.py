"""The published checkpoint files, read and written as they are: config.json and safetensors (one file, or
shards with model.safetensors.index.json), under the original code's key names. `from_pretrained` and
`from_parts` build a model.TinyLLaVA from files, `save_pretrained(model, path)` writes one; model.py knows
nothing of files.

Our module names follow the published keys under shorter prefixes (CHECKPOINT_PREFIXES): our `vision_tower.X`
is `vision_tower._vision_tower.vision_model.X` in the checkpoint, `connector.X` is `connector._connector.X`.
Loading never goes through `transformers`: it builds the model on the meta device, reads each tensor straight
into place, and keeps the published tensors the model does not use (SigLIP's last layer, its head) to write
them back, so a file loaded and saved again holds every tensor it held.
"""

import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import ConnectorConfig, TextConfig, TinyLLaVA, TinyLLaVAConfig, VisionConfig, _pick, build_connector


def from_pretrained(path, device=None, dtype=None):
    """Load a published TinyLLaVA-Video(-R1) directory. dtype None keeps the checkpoint's dtype."""
    file = os.path.join(path, "config.json")
    try:
        with torch.device("meta"):
            model = TinyLLaVA(TinyLLaVAConfig.from_dict(_read_json(file)))
    except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a TinyLLaVA config ({type(e).__name__}: {e})") from None
    _load(model, _checkpoint_files(path), CHECKPOINT_PREFIXES, device, dtype)
    return model.eval()


def from_parts(vision_path, llm_path, connector="mlp2x_gelu", device=None, dtype=None, **connector_options):
    """A new model from a SigLIP directory and a Qwen2 directory (their own HF layouts), with a
    freshly initialised connector (`connector_options` are ConnectorConfig fields, e.g. group=16)."""
    vcfg = _read_json(os.path.join(vision_path, "config.json"))
    vcfg = vcfg.get("vision_config", vcfg)  # a full SigLIP dual encoder nests its vision part
    tcfg = _read_json(os.path.join(llm_path, "config.json"))
    text = TextConfig.from_dict(tcfg)
    config = TinyLLaVAConfig(
        vision=_pick(VisionConfig, vcfg), text=text, torch_dtype=tcfg.get("torch_dtype", tcfg.get("dtype", "bfloat16")),
        connector=ConnectorConfig(connector_type=connector, hidden_size=text.hidden_size,
                                vision_hidden_size=vcfg.get("hidden_size", 1152), **connector_options),
        # the original code builds its decoder and vision tower from these (without them: Llama and CLIP)
        raw={"llm_model_name_or_path": llm_path, "vision_model_name_or_path": vision_path})
    with torch.device("meta"):
        model = TinyLLaVA(config)
    with torch.device(device or "cpu"):  # the connector is new: built for real (meta tensors hold no values)
        model.connector = build_connector(config.connector).to(dtype or _DTYPES.get(config.torch_dtype, torch.float32))
    files = _checkpoint_files(vision_path) + _checkpoint_files(llm_path)
    _load(model, files, {"vision_tower.": "vision_model.", "language_model.": ""}, device, dtype, skip=("connector.",))
    return model.eval()


def _load(model, files, prefixes, device, dtype, skip=()):
    """Read every tensor once, straight into place (the meta model holds no memory, so a 7 GB
    checkpoint is never held twice). One error lists every problem, naming the files."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    published = {_rename(k, prefixes): k for k in expected}  # published key -> our key
    loaded, unexpected, mismatched = {}, [], []
    vision = prefixes["vision_tower."]
    for file in files:
        name = os.path.basename(file)
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    ours = published.get(key)
                    if ours is None and not _known_unused(model.config, key, prefixes):
                        unexpected.append(f"{key} (in {name})")
                    elif ours is None and (key.startswith(vision) or prefixes == CHECKPOINT_PREFIXES):
                        t = f.get_tensor(key)  # kept to be saved back (not a SigLIP text tower's)
                        key = CHECKPOINT_PREFIXES["vision_tower."] + key[len(vision):] if key.startswith(vision) else key
                        model.unused_tensors[key] = t.to(dtype=dtype or t.dtype)
                    elif ours is not None:
                        t, want = f.get_tensor(key), tuple(expected[ours].shape)
                        if tuple(t.shape) != want:
                            mismatched.append(f"{key}: {tuple(t.shape)} in {name}, model expects {want}")
                            published[key] = None  # reported as a mismatch, not as missing
                        else:
                            loaded[ours] = t.to(device=device or "cpu", dtype=dtype or t.dtype)
        except (SafetensorError, OSError) as e:  # a truncated or garbage file
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    bad = [k for k, t in loaded.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # a diverged run's weights would only give empty or garbage answers
        raise CheckpointError(f"{files[0]}: non-finite values (NaN/inf) in {len(bad)} tensors, e.g. {bad[0]}")
    missing = [k for k, ours in published.items() if ours is not None and ours not in loaded]
    if missing or unexpected or mismatched:
        raise CheckpointError("\n".join([f"cannot load {', '.join(files)}:"] + [f"  missing key: {k}" for k in missing]
                                        + [f"  unexpected key: {k}" for k in unexpected]
                                        + [f"  shape mismatch: {m}" for m in mismatched]))
    model.load_state_dict(loaded, strict=False, assign=True)
    model.config.torch_dtype = _dtype_name(next(iter(loaded.values())).dtype, model.config.torch_dtype)


def _known_unused(config, key, prefixes):
    """Keys published but deliberately not loaded: SigLIP's layers above the feature layer, its
    post-layernorm and pooling head, a SigLIP text tower, and lm_head when tied."""
    vision = prefixes["vision_tower."]
    if key.startswith(vision):
        rest = key[len(vision):]
        return rest.startswith(("post_layernorm.", "head.")) or (
            rest.startswith("encoder.layers.") and int(rest.split(".")[2]) >= config.vision_layers_used)
    if key.startswith(("text_model.", "logit_scale", "logit_bias")) and vision == "vision_model.":
        return True
    return key == prefixes["language_model."] + "lm_head.weight" and config.text.tie_word_embeddings


def published_state_dict(model, state_dict=None):
    """The model's tensors (or `state_dict`'s, keyed as ours) under their published keys, plus the
    published ones we read but do not use."""
    out = {_rename(k, CHECKPOINT_PREFIXES): v for k, v in (state_dict or model.state_dict()).items()}
    return {**out, **model.unused_tensors}


def save_pretrained(model, path, max_shard_bytes=5 * 1024**3, state_dict=None):
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) in the
    published layout, into a temporary directory renamed into place, so an interrupted save never
    leaves a half-written checkpoint at `path`. state_dict: the tensors to write, keyed as ours
    (e.g. gathered whole from FSDP shards); default the model's own. Other files there are kept."""
    state = {k: v.detach().contiguous().cpu() for k, v in published_state_dict(model, state_dict).items()}
    nbytes = {k: v.numel() * v.element_size() for k, v in state.items()}
    shards, size = [[]], 0
    for k, n in nbytes.items():
        if shards[-1] and size + n > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += n
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
    try:
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards):
            save_file({k: state[k] for k in keys}, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
        model.config.torch_dtype = _dtype_name(next(iter(state.values())).dtype, model.config.torch_dtype)
        _write_json(os.path.join(tmp, "config.json"), model.config.to_dict())
        if os.path.isdir(path):  # keep any other files (tokenizer, optimizer state) already there
            for name in {n for n in os.listdir(path) if not n.startswith("model")} - set(os.listdir(tmp)):
                src = os.path.join(path, name)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
            os.rename(path, tmp + ".old")
        os.rename(tmp, path)
        shutil.rmtree(tmp + ".old", ignore_errors=True)  # the previous checkpoint, if there was one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


CHECKPOINT_PREFIXES = {"vision_tower.": "vision_tower._vision_tower.vision_model.",  # ours -> published
                       "connector.": "connector._connector.", "language_model.": "language_model."}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _rename(key, prefixes):  # our key -> its published key, by the first prefix it starts with
    prefix = next(p for p in prefixes if key.startswith(p))
    return prefixes[prefix] + key[len(prefix):]


def _dtype_name(dtype, default):  # the config says which dtype the weights are: kept truthful
    return {v: k for k, v in _DTYPES.items()}.get(dtype, default)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: one message naming the file and every bad key."""


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _checkpoint_files(path):
    """The safetensors files of a checkpoint directory: the index's shards, or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = [os.path.join(path, s) for s in sorted(set(_read_json(index)["weight_map"].values()))]
        absent = [f for f in files if not os.path.exists(f)]
        if absent:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(absent)}")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
