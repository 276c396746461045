"""From video files and annotation rows to what the model eats: frames, pixels, token ids.

    video file --sample_frames--> (T, H, W, 3) uint8 RGB, T frames spread uniformly over the clip
      --preprocess_frames--> (T, 3, 384, 384) float in [-1, 1], resized the way Pillow does it
    question --build_prompt--> the qwen2_base chat text --Tokenizer.prompt_ids--> ids with one -200

The published model saw 16 frames picked with `np.linspace(0, N-1, 16).astype(int)` over all decoded
frames, each resized with Pillow's bicubic filter (which antialiases when shrinking; OpenCV's INTER_CUBIC
does not, and differs by a few percent of the range on a 720p frame). Both are reproduced here without
Pillow. Then the datasets of the paper (NextQA GRPO rows, cold-start conversations, plain multiple
choice) and batching.
"""

import functools
import json
import os
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from model import IMAGE_TOKEN_INDEX


class VideoError(Exception):
    """A video that cannot be used: missing, not a video, or without a decodable frame."""


class DataError(ValueError):
    """A malformed annotation: the message names the file, the line and the field."""


# ----------------------------------------------------------------------------- frames

def frame_indices(n, num_frames):
    """The original's uniform pick: num_frames indices over n frames (repeats when n < num_frames)."""
    return np.linspace(0, n - 1, num_frames).astype(int)


def _open(path):
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise VideoError(f"{path}: cannot be opened as a video")
    return cap


def _read(path, wanted=None, cap=None):
    """Decode sequentially (seeking is unreliable on some codecs), keeping only the frames whose index is
    in `wanted` and stopping after the last of them; wanted=None decodes everything to count the frames.
    `cap`: the file already opened, at its first frame. -> ({index: RGB frame}, number of frames decoded)."""
    cap, keep, n = cap if cap is not None else _open(path), {}, 0
    stop = max(wanted) if wanted else float("inf")
    try:
        while n <= stop and cap.grab():
            if wanted and n in wanted:
                ok, frame = cap.retrieve()
                if ok:
                    keep[n] = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB)
            n += 1
    finally:
        cap.release()
    return keep, n


def sample_frames(path, num_frames=16, max_frames=None):
    """(T, H, W, 3) uint8 RGB frames of a video file, spread uniformly over all its frames. num_frames=None with
    max_frames: the "fps mode", min(max_frames, max(1, int(duration_s))) frames (no frame rate: 1 fps assumed)."""
    if num_frames is None and not max_frames:
        raise ValueError("sample_frames: give num_frames, or num_frames=None with max_frames")
    pick = lambda n, fps: frame_indices(n, num_frames if num_frames is not None else
                                        min(max_frames, max(1, int(n / fps if fps and fps > 0 else n))))
    return read_frames(path, pick)[0]


def read_frames(path, pick):
    """-> ((T, H, W, 3) uint8 RGB, indices): the frames pick(n, fps) -> indices chooses among the n frames
    of a video file. The container's frame count is trusted only if the chosen frames decode; otherwise
    the real count is taken from a full sequential pass and the frames read again."""
    cap = _open(path)  # also decodes the first pass: opening a file costs as much as decoding a small clip
    reported, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
    for attempt in range(2):  # the reported count, else (or if its frames do not decode) the count by decoding
        n = reported if attempt == 0 and reported > 0 else _read(path)[1]
        if n <= 0:
            break
        idx = np.asarray(pick(n, fps))
        frames, cap = _read(path, set(idx.tolist()), cap)[0], None  # _read releases it
        if all(i in frames for i in idx):
            return np.stack([frames[i] for i in idx]), idx
    if cap is not None:
        cap.release()
    raise VideoError(f"{path}: no decodable frame")


# ----------------------------------------------------------------------------- preprocessing
# Pillow's resize: a separable filter, one pass per axis, each output pixel a weighted sum
# of the input pixels under the filter; when shrinking, the filter is stretched by the scale factor
# (that is the antialiasing). Between the passes and at the end values are rounded and clipped to 0..255.

def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


PRECISION_BITS = 22  # Pillow computes 8-bit resizes in fixed point: weights scaled by 2**22, int32 sums


@functools.lru_cache(maxsize=16)  # the same few sizes every video: computing the taps took half of preprocessing
def resize_weights(size_in, size_out):
    """Taps of Pillow's bicubic filter: indices (out, K) and fixed-point weights (out, K), rows zero-padded."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    K = int(np.ceil(support)) * 2 + 1
    idx, w = np.zeros((size_out, K), np.int64), np.zeros((size_out, K), np.int32)
    for o in range(size_out):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size_in)
        taps = np.arange(lo, hi)
        ww = _cubic((taps - center + 0.5) / stretch)
        ww = ww / ww.sum() * (1 << PRECISION_BITS)
        idx[o, :len(taps)], w[o, :len(taps)] = taps, np.trunc(ww + np.where(ww < 0, -0.5, 0.5))
    return torch.from_numpy(idx), torch.from_numpy(w)


def _resize_axis(x, axis, size_out):
    """Resize one axis of a uint8 tensor exactly as Pillow does (fixed point, rounded, clipped to 0..255).
    The axis is moved first so that each filter tap gathers whole contiguous rows."""
    if x.shape[axis] == size_out:
        return x
    idx, w = resize_weights(x.shape[axis], size_out)
    rows = x.movedim(axis, 0).contiguous()
    flat = rows.reshape(rows.shape[0], -1)  # (size_in, everything else), still uint8: cheap to move
    # Pillow's fixed-point weights as exact float32 fractions; float32 sums round like its integer sums
    # except within ~1e-5 of a half level, which moves a rare pixel by one level (and runs 2x faster)
    out = torch.full((size_out, flat.shape[1]), 0.5)  # + 0.5: rounding
    w = w.float() / (1 << PRECISION_BITS)
    for k in range(idx.shape[1]):
        out.addcmul_(flat[idx[:, k]].float(), w[:, k, None])
    out = out.floor_().clamp_(0, 255).to(torch.uint8)  # clip to 8 bits, as each Pillow pass does
    return out.reshape(size_out, *rows.shape[1:]).movedim(0, axis)


def preprocess_frames(frames, size=384):
    """(T, H, W, 3) uint8 RGB -> (T, 3, size, size) float: Pillow-style bicubic resize ignoring aspect
    ratio, then /255, then (x - 0.5) / 0.5 (SigLIP's mean and std are 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8))  # (T, H, W, 3)
    # Horizontal pass first, as Pillow up to 12 (what the published model saw) always did; the order
    # matters because each pass rounds to 0..255. (Pillow 13 goes vertical first on some tall images.)
    x = _resize_axis(x, 2, size)  # (T, H, size, 3)
    x = _resize_axis(x, 1, size)  # (T, size, size, 3)
    return (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def load_video(path, num_frames=16, max_frames=None, size=384):
    """A video file -> (T, 3, size, size) pixel values for the vision tower."""
    return preprocess_frames(sample_frames(path, num_frames, max_frames), size)


# ----------------------------------------------------------------------------- prompt and tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
THINK_ANSWER = "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
GRPO_SUFFIX, REASON_SUFFIX = " " + THINK_ANSWER, "\n" + THINK_ANSWER  # NextQA's GRPO rows; the evaluation's
OPTION_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
EOS = "<|endoftext|>"  # Qwen2.5: end of text, also the padding token; there is no BOS


def build_prompt(question):
    """The qwen2_base template: the system sentence, one space, the user turn with the video first."""
    if "<image>" in question:
        raise ValueError("the question must not contain <image>: the template puts the video first")
    return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"


def format_options(options):
    """["sit down", "run"] -> "A. sit down\\nB. run" (options already lettered "A. ..." are kept)."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return "\n".join(o if o.startswith(f"{a}.") else f"{a}. {o}" for a, o in zip(letters, options))


def mc_question(question, options, mode="reason"):
    """A multiple-choice question as the evaluation asks it, in "reason" or "option" mode."""
    if mode not in ("reason", "option"):
        raise ValueError(f"mode must be reason or option, not {mode!r}")
    return f"{question}\n{format_options(options)}" + (REASON_SUFFIX if mode == "reason" else OPTION_SUFFIX)


# Qwen2's pre-tokenizer split (the same regex as in Qwen's tokenizer.json), then byte-level BPE.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# What the original code saves for a tokenizer (transformers' slow Qwen2Tokenizer), and the fast file.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json",
                   "special_tokens_map.json")


def slow_tokenizer(folder):
    """Qwen2's tokenizer built with `tokenizers` alone from vocab.json and merges.txt, the added tokens
    (special or not) taken from tokenizer_config.json's added_tokens_decoder, else added_tokens.json."""
    def read(name, default=None):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return default
        with open(path, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None

    vocab, merges = models.BPE.read_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    added = {int(i): t for i, t in (read("tokenizer_config.json", {}).get("added_tokens_decoder") or {}).items()}
    for content, i in read("added_tokens.json", {}).items():
        added.setdefault(int(i), {"content": content, "special": True})
    vocab.update({t["content"]: i for i, t in added.items()})  # the ids the files give, not the next free ones
    tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    flags = ("lstrip", "rstrip", "normalized", "single_word")
    tok.add_tokens([AddedToken(t["content"], special=t.get("special", True), **{k: t.get(k, False) for k in flags})
                    for _, t in sorted(added.items())])
    return tok


class Tokenizer:
    """A Hugging Face tokenizer read with `tokenizers` (tokenizer.json, or Qwen2's slow-tokenizer files),
    with the prompt and label rules of the paper."""

    def __init__(self, path, max_vocab=None):
        """max_vocab: the model's embedding rows; a larger vocabulary belongs to another model."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isfile(file):
            try:
                self.tok = HFTokenizer.from_file(file)
            except Exception as e:  # tokenizers raises a bare Exception on a malformed file
                raise DataError(f"{file}: not a readable tokenizer ({e})") from None
        elif os.path.isdir(path) and all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
            self.tok, file = slow_tokenizer(path), os.path.join(path, "vocab.json")
        else:
            raise FileNotFoundError(f"{file}: no such tokenizer file (nor vocab.json and merges.txt beside it)")
        self.eos_id = self.pad_id = self.tok.token_to_id(EOS)
        if self.eos_id is None:
            raise DataError(f"{file}: the vocabulary has no {EOS} token")
        self.vocab_size = self.tok.get_vocab_size()
        if max_vocab is not None and self.vocab_size > max_vocab:
            raise DataError(f"{file}: {self.vocab_size} tokens, more than the model's {max_vocab} embeddings")

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def prompt_ids(self, question, max_len=3072):
        """Token ids of the prompt: each side of <image> tokenized on its own, joined by IMAGE_TOKEN_INDEX."""
        before, after = build_prompt(question).split("<image>")
        return (self.encode(before) + [IMAGE_TOKEN_INDEX] + self.encode(after))[:max_len]

    def sft_ids(self, question, answer, max_len=3072):
        """(input_ids, labels) for supervised training: prompt, " answer", eos; labels -100 on the prompt."""
        prompt = self.prompt_ids(question, max_len)
        target = self.encode(" " + answer) + [self.eos_id]
        return (prompt + target)[:max_len], ([-100] * len(prompt) + target)[:max_len]


def train_tokenizer(texts, path, vocab_size=512):
    """A small byte-level BPE tokenizer (with Qwen's special tokens) trained on `texts`, saved to `path`."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return Tokenizer(path)


# ----------------------------------------------------------------------------- datasets and batches

@dataclass
class Sample:
    video: str  # the video's path, joined to the dataset root
    question: str  # the text that goes into build_prompt
    solution: str  # GRPO: as given ("<answer>B</answer>" or "B"); cold start: the full answer; MC: the letter
    meta: dict = field(default_factory=dict)  # the row's other fields, and "line"


def _field(row, key, path, line, kind=str):
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line}: a row must be a JSON object")
    if key not in row:
        raise DataError(f"{path}:{line}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise DataError(f"{path}:{line}: field {key!r} must be {getattr(kind, '__name__', kind)}")
    return row[key]


def _rows(path):
    """(line number, parsed object) for a .jsonl file or the items of a .json list."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:  # bytes: one bad byte costs one row, not the file; utf-8-sig drops a leading BOM
        if path.endswith(".json"):
            try:
                items = json.loads(f.read().decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: not valid UTF-8 JSON ({e})") from None
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a JSON list")
            return [(i + 1, item) for i, item in enumerate(items)]
        out = []
        for i, line in enumerate(f):
            try:
                line = line.decode("utf-8-sig")
                if line.strip():
                    out.append((i + 1, json.loads(line)))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                what = "UTF-8" if isinstance(e, UnicodeDecodeError) else "JSON"
                out.append((i + 1, DataError(f"{path}:{i + 1}: not valid {what} ({getattr(e, 'msg', e)})")))
        return out


def _grpo_sample(row, path, line, root):
    problem, solution, video = (_field(row, k, path, line) for k in ("problem", "solution", "video_filename"))
    meta = {k: v for k, v in row.items() if k not in ("problem", "solution", "video_filename")}
    return Sample(os.path.join(root, video), problem + GRPO_SUFFIX, solution, {**meta, "line": line})


def _coldstart_sample(row, path, line, root):
    video = _field(row, "video", path, line)
    turns = _field(row, "conversations", path, line, list)
    if len(turns) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
        raise DataError(f"{path}:{line}: field 'conversations' needs a human and a gpt turn with 'value'")
    question = turns[0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
    meta = {k: v for k, v in row.items() if k not in ("video", "conversations")}
    return Sample(os.path.join(root, video), question, turns[1]["value"], {**meta, "line": line})


def _mc_sample(row, path, line, root, mode):
    video, question = _field(row, "video", path, line), _field(row, "question", path, line)
    options, answer = _field(row, "options", path, line, list), _field(row, "answer", path, line)
    if len(answer) != 1 or not "A" <= answer <= chr(ord("A") + len(options) - 1):
        raise DataError(f"{path}:{line}: field 'answer' must be one of the option letters, not {answer!r}")
    meta = {k: v for k, v in row.items() if k not in ("video", "question", "answer")}
    return Sample(os.path.join(root, video), mc_question(question, options, mode), answer, {**meta, "line": line})


def read_samples(path, root=None, errors="raise", mode="reason"):
    """Any of the three formats, told apart by their fields. -> (samples, messages of skipped rows).

    .json list with "conversations": cold start; .jsonl with "problem": NextQA GRPO; .jsonl with
    "options": plain multiple choice. errors="skip" skips malformed rows and returns their messages."""
    root = root or os.path.dirname(os.path.abspath(path))
    samples, skipped = [], []
    for line, row in _rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict) or not {"conversations", "problem", "options"} & set(row):
                raise DataError(f"{path}:{line}: not a known row format (needs 'conversations', 'problem' or 'options')")
            s = (_coldstart_sample(row, path, line, root) if "conversations" in row else
                 _grpo_sample(row, path, line, root) if "problem" in row else _mc_sample(row, path, line, root, mode))
            if "<image>" in s.question:  # the prompt template puts the video first, alone
                raise DataError(f"{path}:{line}: the question contains <image> (the video goes before the question)")
            samples.append(s)
        except DataError as e:
            if errors == "raise":
                raise
            skipped.append(str(e))
    return samples, skipped


def step_samples(samples, step, per_step, seed):
    """The samples of step `step`, each epoch a fixed permutation per (seed, epoch): resuming needs only the step."""
    epoch, i = divmod(step, max(1, len(samples) // per_step))
    order = np.random.RandomState(seed * 1000 + epoch).permutation(len(samples))
    return [samples[j] for j in order[i * per_step:(i + 1) * per_step]]


class VideoLoader:
    """Loads and preprocesses videos, skipping (and counting) the ones that cannot be read."""

    def __init__(self, frames, size):
        self.frames, self.size, self.skipped = frames, size, []

    def __call__(self, samples):
        """-> the samples that loaded and their pixels (B, T, 3, size, size)."""
        good, pixels = [], []
        for s in samples:
            try:
                pixels.append(load_video(s.video, num_frames=self.frames, size=self.size))
                good.append(s)
            except VideoError as e:
                self.skipped.append(str(e))
                tqdm.write(f"skipping sample: {e}")
        return good, (torch.stack(pixels) if pixels else None)


def collate_prompts(id_lists, pad_id):
    """Prompts for generation, LEFT-padded so that every row ends at its last real token.
    -> ids (B, L) long, mask (B, L) bool."""
    L = max(len(x) for x in id_lists)
    ids = torch.full((len(id_lists), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(id_lists), L, dtype=torch.bool)
    for i, x in enumerate(id_lists):
        ids[i, L - len(x):], mask[i, L - len(x):] = torch.tensor(x), True
    return ids, mask


def collate_sft(pairs, pad_id):
    """(input_ids, labels) pairs for training, RIGHT-padded. -> ids, labels (-100 on pads), mask: (B, L)."""
    L = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), L), -100, dtype=torch.long)
    mask = torch.zeros(len(pairs), L, dtype=torch.bool)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), True
    return ids, labels, mask
