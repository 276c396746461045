"""TinyLLaVA-Video, the model of TinyLLaVA-Video-R1, in plain PyTorch.

A video becomes text-sized tokens in three steps, and a language model reads them like words:

    pixel_values (B, T, 3, 384, 384)                 T frames, normalised to [-1, 1]
      -> SigLIP vision encoder, hidden state of layer 26 of 27, no post-layernorm
                                     (B*T, 729, 1152)   27 x 27 patches of 14 pixels
      -> "patch" selection drops token 0 of every frame (SigLIP has no CLS token, so this
         drops a real patch: it is what the published model was trained with)
                                     (B, T*728, 1152)   all frames in one sequence
      -> connector: the group resampler of the published checkpoints squeezes each of 16
         groups of tokens into 32 learned latents
                                     (B, 512, 2048)
      -> spliced into the prompt at the single IMAGE_TOKEN_INDEX (-200) placeholder
      -> Qwen2 decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings)
                                     (B, L - 1 + 512, 151936) logits

Module names follow the published safetensors keys, so a reader can map every tensor to its key
(weights.py reads and writes the published files; this file knows nothing of files). Sections
follow the data: configs, vision encoder, connectors, decoder with its key/value cache, the whole model.
"""

import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IMAGE_TOKEN_INDEX = -200  # the placeholder id in prompt ids; the model puts the video tokens here


# ----------------------------------------------------------------------------- configs
# Defaults are the published TinyLLaVA-Video-R1 (SigLIP so400m-patch14-384 + Qwen2.5-3B, group
# resampler 16 x 32). `_pick` reads a Hugging Face style config.json dict: unknown fields are
# ignored, missing ones keep these defaults.


def _pick(cls, d):
    return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


@dataclass
class VisionConfig:  # SigLIP so400m-patch14-384, vision tower only
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6


@dataclass
class ConnectorConfig:
    connector_type: str = "groupresampler"  # or "naiveresampler", "mlp2x_gelu"
    num_queries: int = 512  # resamplers: output tokens per video
    group: int = 16  # groupresampler: independent chunks, num_queries // group latents each
    num_resampler_layers: int = 3
    vision_hidden_size: int = 1152
    hidden_size: int = 2048  # the decoder's width
    heads: int = 8  # resampler attention: 8 heads of 64, as published (not in config.json)
    dim_head: int = 64
    ff_mult: int = 4


@dataclass
class TextConfig:  # Qwen2.5-3B
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):  # newer HF layout
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)
        return _pick(cls, d)


@dataclass
class TinyLLaVAConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vision_feature_layer: int = -2  # hidden_states index: -2 is the output of layer 26 of 27
    vision_feature_select_strategy: str = "patch"  # "patch" drops token 0, "cls_patch" keeps all
    image_token_index: int = IMAGE_TOKEN_INDEX
    tokenizer_model_max_length: int = 3072
    pad_token: str = "<|endoftext|>"
    torch_dtype: str = "bfloat16"
    raw: dict = field(default_factory=dict, repr=False)  # the config.json as read, saved back as is

    @classmethod
    def from_dict(cls, d):
        """Build from a TinyLLaVA config.json dict, saying which inferred fields were absent."""
        top = {f.name: d[f.name] for f in dataclasses.fields(cls)
               if f.name in d and f.name not in ("vision", "connector", "text", "raw")}
        text = TextConfig.from_dict(d.get("text_config") or {k: d[k] for k in ("hidden_size", "vocab_size") if k in d})
        if "vision_config" not in d:
            warnings.warn("config.json has no vision_config: using SigLIP so400m-patch14-384 defaults")
        vision = _pick(VisionConfig, d.get("vision_config") or {})
        conn = {**d, "hidden_size": text.hidden_size, "vision_hidden_size": d.get("vision_hidden_size", vision.hidden_size)}
        return cls(vision=vision, connector=_pick(ConnectorConfig, conn), text=text, raw=dict(d), **top)

    def to_dict(self):
        d = dict(self.raw)
        # heads, dim_head, ff_mult are not in the published config.json: written only when not the published ones
        d.update({k: v for k, v in dataclasses.asdict(self.connector).items()
                  if k not in ("heads", "dim_head", "ff_mult") or v != getattr(ConnectorConfig, k)})
        d.update(hidden_size=self.text.hidden_size, vocab_size=self.text.vocab_size,
                 **{k: getattr(self, k) for k in ("vision_feature_layer", "vision_feature_select_strategy",
                    "image_token_index", "tokenizer_model_max_length", "pad_token", "torch_dtype")})
        d["text_config"] = {**d.get("text_config", {}), **dataclasses.asdict(self.text), "model_type": "qwen2"}
        d["vision_config"] = {**d.get("vision_config", {}), **dataclasses.asdict(self.vision), "model_type": "siglip_vision_model"}
        return d

    @property
    def vision_layers_used(self):
        k = self.vision_feature_layer  # layers run: hidden_states[k] is the output of layer k (0: embeddings)
        return self.vision.num_hidden_layers + 1 + k if k < 0 else k


# Named small sizes, for a CPU: "tiny" is `bench.py --tiny`'s (a GRPO step in well under a second),
# "test" the tests' (3 patches a frame, 4 video tokens). The resampler keeps the published 8 heads of 64.
CONFIGS = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8),  # 16 patches a frame, 15 kept
                 connector=dict(num_queries=16, group=4, num_resampler_layers=1, vision_hidden_size=32, hidden_size=64),
                 text=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
    "test": dict(vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                             image_size=16, patch_size=8),
                 connector=dict(num_queries=4, group=2, num_resampler_layers=1, vision_hidden_size=32, hidden_size=32),
                 text=dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)),
}


def config(name, vision=None, connector=None, text=None, **fields):
    """A named size with some fields replaced: config("test", text={"vocab_size": 300}, raw={"num_frames": 4})."""
    c = CONFIGS[name]
    return TinyLLaVAConfig(vision=VisionConfig(**{**c["vision"], **(vision or {})}),
                           connector=ConnectorConfig(**{**c["connector"], **(connector or {})}),
                           text=TextConfig(**{**c["text"], **(text or {})}), **{"torch_dtype": "float32", **fields})


# ----------------------------------------------------------------------------- vision encoder
# SigLIP's vision transformer: a patch conv, a learned position table, then pre-norm blocks
# with biases everywhere and tanh-approximated GELU. No CLS token, no mask.


class SiglipAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (N, P, d)
        N, P, d = x.shape
        q, k, v = (p(x).view(N, P, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, P, 72)
        return self.out_proj(out.transpose(1, 2).reshape(N, P, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)

    def forward(self, pixels):  # (N, 3, 384, 384) -> (N, 729, 1152); the last 6 pixel rows/cols are unused
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class SiglipVisionEncoder(nn.Module):
    """Returns hidden_states[num_layers]: only the layers whose output is used are built and run."""

    def __init__(self, cfg, num_layers):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = nn.Module()  # a bare container, so that keys read encoder.layers.N
        self.encoder.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(num_layers))

    def forward(self, pixels):  # (N, 3, H, W) -> (N, P, hidden); frozen in training, so never checkpointed
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- connectors


def sinusoid_table(n, dim, device=None):
    """(n, dim) position encoding: sin on even channels, cos on odd, frequencies 10000^(-2i/dim). Rounded
    to fp16, as the original built it; the published weights were trained with that table."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    angle = pos * torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1).half()  # (n, dim/2, 2) -> (n, dim)


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to [media tokens, latents] (keys and values). 8 heads of 64."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner, self.heads = heads * dim_head, heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # first half keys, second half values
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents):  # (B, N, D), (B, n, D) -> (B, n, D)
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, 8, *, 64)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(64), no mask
        return self.to_out(out.transpose(1, 2).flatten(2))


def feed_forward(dim, mult):  # an nn.Sequential so that keys read layers.I.1.{0,1,3}
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler. `groupresampler`: the token sequence is cut into `group` contiguous
    chunks (the first L % group one token longer), each squeezed into the same num_queries/group
    latents independently, outputs concatenated, then a position table added. `naiveresampler`:
    one set of num_queries latents over all tokens, the position table added to the input tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.grouped = cfg.connector_type == "groupresampler"
        self.group = cfg.group if self.grouped else 1
        d = cfg.hidden_size
        self.latents = nn.Parameter(torch.randn(cfg.num_queries // self.group, d))
        self.linear = nn.Linear(cfg.vision_hidden_size, d)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(d, cfg.heads, cfg.dim_head), feed_forward(d, cfg.ff_mult)])
            for _ in range(cfg.num_resampler_layers))
        self.norm = nn.LayerNorm(d)

    def resample(self, x):  # (B, N, D) -> (B, n, D)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)

    def forward(self, x):  # (B, T*728, 1152) -> (B, num_queries, D)
        x = self.linear(x)
        if not self.grouped:
            return self.resample(x + sinusoid_table(x.shape[1], x.shape[2], x.device).to(x.dtype))
        # With 16 frames and 16 groups each chunk is exactly one frame.
        out = torch.cat([self.resample(chunk) for chunk in torch.tensor_split(x, self.group, dim=1)], dim=1)
        return out + sinusoid_table(out.shape[1], out.shape[2], out.device).to(out.dtype)


def build_connector(cfg):
    if cfg.connector_type in ("groupresampler", "naiveresampler"):
        return Resampler(cfg)
    if cfg.connector_type == "mlp2x_gelu":  # TinyLLaVA Factory's MLP, per token: keys 0.* and 2.*
        d = cfg.hidden_size
        return nn.Sequential(nn.Linear(cfg.vision_hidden_size, d), nn.GELU(), nn.Linear(d, d))
    raise ValueError(f"unknown connector_type {cfg.connector_type!r} (groupresampler, naiveresampler or mlp2x_gelu)")


# ----------------------------------------------------------------------------- decoder
# Qwen2: pre-norm blocks x + attn(norm(x)), x + mlp(norm(x)); RMSNorm in fp32; rotate-half RoPE;
# grouped-query attention (16 query heads share 2 key/value heads); biases on q/k/v only.


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()  # once: in a bf16 model every call is a full-size copy
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions (B, L) -> cos, sin (B, 1, L, head_dim), computed in fp32: cat(freqs, freqs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    emb = (positions.float()[..., None] * inv_freq).repeat(1, 1, 2)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, heads, L, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys and values, static shapes so a decode step can be compiled: k, v hold one
    (B, kv_heads, max_len, head_dim) tensor per layer (one big tensor made torch.compile copy it all every
    step). All rows write the same slot each step (prompts are left-padded); `valid` (B, max_len) marks real
    tokens, `next_pos` (B,) each row's next RoPE position. The write slot is kept twice: `pos` on the device,
    advanced by the step itself (no host value baked into the graph), and `length` on the host, advanced by
    `reserve` (bounds checks without a sync). Updates are in place: a CUDA graph reads fixed addresses."""

    def __init__(self, cfg, batch, max_len, device=None, dtype=torch.float32):
        shape, n = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim), cfg.num_hidden_layers
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)] for _ in "kv")
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.next_pos = torch.zeros(batch, device=device, dtype=torch.long)
        self.pos = torch.zeros((), device=device, dtype=torch.long)  # the next slot to write, on the device
        self.length, self.max_len = 0, max_len  # length: slots written so far, every row (== pos, on the host)

    def reserve(self, n):  # claim the next n slots on the host, before a step writes them
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} tokens > max_len {self.max_len}")
        self.length += n

    def repeat_interleave(self, n):  # B -> B*n: one prefilled prompt shared by a group of G samples; copies by
        # index_select, as select_rows (a compiled step guards on the layout: a view would compile it again)
        return self.select_rows(torch.arange(self.next_pos.shape[0], device=self.pos.device).repeat_interleave(n))

    def select_rows(self, rows):  # B -> len(rows): finished samples leave a rollout's batch
        new = copy.copy(self)  # length and max_len as they are
        new.k, new.v = [t.index_select(0, rows) for t in self.k], [t.index_select(0, rows) for t in self.v]
        new.valid, new.next_pos, new.pos = self.valid[rows], self.next_pos[rows], self.pos.clone()
        return new


class Qwen2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.heads * hd)
        self.k_proj = nn.Linear(d, self.kv_heads * hd)
        self.v_proj = nn.Linear(d, self.kv_heads * hd)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, slots=None):  # x (B, L, d), mask (B, 1, 8*L, S)
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # q (B, 16, L, 128), k and v (B, 2, L, 128)
        if cache is not None:  # write this step's keys/values, attend over all max_len slots
            cache.k[layer].index_copy_(2, slots, k.to(cache.k[layer].dtype))
            cache.v[layer].index_copy_(2, slots, v.to(cache.v[layer].dtype))
            k, v = cache.k[layer].to(q.dtype), cache.v[layer].to(q.dtype)
        if mask is None:  # plain causal attention (no padding before any real token): the flash kernel.
            # Keys and values repeated for the 8 query heads that share them: 8x a layer's keys of one
            # sequence is a few MB, small beside what the flash kernel saves over a masked one.
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))  # (B, 16, L, 128)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, 16, L, 128)
            return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))
        # Grouped-query attention without copying keys and values: the 8 query heads that share a
        # key/value head become 8 x L query rows of that head, row j*L + l for head kv*8 + j at
        # position l (the mask comes in that layout). SDPA's enable_gqa with a mask would run the
        # math kernel, which copies every cached key and value 8 times, in fp32.
        q = q.reshape(B, self.kv_heads, -1, q.shape[-1])  # (B, 2, 8*L, 128)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, 2, 8*L, 128)
        return self.o_proj(out.reshape(B, self.heads, L, -1).transpose(1, 2).reshape(B, L, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x, attention_mask=None, cache=None):
        """x (B, L, d) embeddings -> (B, L, d) final hidden states. attention_mask (B, L), 1 for real tokens, may
        pad either side; real tokens get positions 0, 1, 2... With a cache, the L tokens fill the next L slots and
        attend to everything written before them. Without a cache and with no padding before a real token
        (completions that ended early pad only after), attention is plain causal, maskless, so SDPA may pick its flash
        kernel; outputs after a row's last real token then differ from the masked path's, and nothing reads them."""
        if cache is not None:
            cache.reserve(x.shape[1])
        elif attention_mask is not None and not (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            attention_mask = None
        return self.run_layers(x, attention_mask, cache)

    def run_layers(self, x, attention_mask=None, cache=None):
        """`forward` once the cache slots are reserved (no mask and no cache: plain causal). Tensor operations only,
        no host values and no syncs, so a decode step is the same graph every time (what grpo.FastDecode compiles)."""
        B, L, _ = x.shape
        real = torch.ones(B, L, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
        slots = torch.arange(L, device=x.device)  # (L,) the slots these tokens fill
        key_real, key_slots, first_pos = real, slots, 0
        if cache is not None:
            slots = cache.pos + slots
            cache.valid.index_copy_(1, slots, real)
            key_real, key_slots = cache.valid, torch.arange(cache.valid.shape[1], device=x.device)
            first_pos = cache.next_pos[:, None].clone()  # (B, 1), read before the advance below
            cache.next_pos.add_(real.sum(1))
            cache.pos.add_(L)
        positions = (first_pos + real.cumsum(1) - 1).clamp(min=0)  # (B, L)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = None
        if attention_mask is not None or cache is not None:
            # (B, L, S): causal over slots, real keys only; every slot sees itself so that rows of
            # pure padding stay finite instead of a softmax over nothing.
            causal = key_slots[None, :] <= slots[:, None]
            mask = (causal[None] & key_real[:, None, :]) | (key_slots[None, :] == slots[:, None])[None]
            # In the attention's grouped layout: rows j*L + l for the j-th query head of a key/value head.
            rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
            # Additive (0 or the lowest value) in the attention's dtype, made once for every layer: SDPA would
            # convert a bool mask to this at every call (on the CPU, 40% of a decode step's attention).
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            mask = torch.zeros((), dtype=dtype, device=x.device).masked_fill(~mask, torch.finfo(dtype).min)
            mask = mask[:, None].repeat(1, 1, rep, 1)  # (B, 1, 8*L, S)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, slots)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        # Tied (Qwen2.5-3B): the output projection is the embedding table, so there is no lm_head.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, hidden):  # (..., d) -> (..., vocab)
        return F.linear(hidden, self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    def forward(self, input_ids, attention_mask=None, cache=None):
        return self.logits(self.model(self.model.embed_tokens(input_ids), attention_mask, cache))

    def decode_step(self, tokens, cache):
        """tokens (N,) -> next-token logits (N, vocab); grpo.FastDecode stands in with the same results."""
        cache.reserve(1)
        return self.step_logits(tokens, cache)

    def step_logits(self, tokens, cache):
        """`decode_step` once its slot is reserved: the same shapes and kernels every step (FastDecode captures it)."""
        return self.logits(self.model.run_layers(self.model.embed_tokens(tokens[:, None]), None, cache)[:, -1])


# ----------------------------------------------------------------------------- the whole model


class TinyLLaVA(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or TinyLLaVAConfig()
        self.vision_tower = SiglipVisionEncoder(config.vision, config.vision_layers_used)
        self.connector = build_connector(config.connector)
        self.language_model = Qwen2ForCausalLM(config.text)
        if not self.language_model.model.norm.weight.is_meta:  # on meta (loading, --dry-run) there is nothing to fill
            self.apply(_init_weights)
        # Published tensors the model does not use (SigLIP's layers above the feature layer, post_layernorm,
        # head), kept as read under their published keys so that weights.save_pretrained writes them back.
        self.unused_tensors = {}

    def vision_features(self, pixel_values):
        """(B, T, 3, H, W) -> (B, T*728, 1152): the frozen part, computed once per video in GRPO."""
        B, T = pixel_values.shape[:2]
        feats = self.vision_tower(pixel_values.flatten(0, 1))  # (B*T, 729, 1152)
        if self.config.vision_feature_select_strategy == "patch":
            feats = feats[:, 1:]  # (B*T, 728, 1152)
        return feats.reshape(B, -1, feats.shape[-1])

    def connect(self, features):
        """(B, T*728, 1152) -> (B, Q, hidden) in the decoder's dtype."""
        out = self.connector(features.to(next(self.connector.parameters()).dtype))
        return out.to(self.language_model.model.embed_tokens.weight.dtype)

    def encode_video(self, pixel_values):
        """(B, T, 3, H, W) -> (B, Q, hidden): Q = 512 for the resamplers, T*728 for the MLP."""
        return self.connect(self.vision_features(pixel_values))

    def new_cache(self, batch, max_len):
        """An empty KV cache for `batch` rows of up to `max_len` tokens, in the decoder's dtype."""
        w = self.language_model.model.embed_tokens.weight
        return KVCache(self.config.text, batch, max_len, device=w.device, dtype=w.dtype)

    def embed(self, input_ids, video_embeds, attention_mask=None):
        """Splice video embeddings at the placeholder: ids (B, L), video (B, Q, d) ->
        embeddings (B, L-1+Q, d) and the attention mask (B, L-1+Q) with the video tokens real."""
        where = input_ids == self.config.image_token_index
        if not (where.sum(1) == 1).all():
            raise ValueError(f"every row of input_ids needs exactly one IMAGE_TOKEN_INDEX "
                             f"({self.config.image_token_index}); found {where.sum(1).tolist()}")
        text = self.language_model.model.embed_tokens(input_ids.masked_fill(where, 0))  # (B, L, d)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        embeds, masks, video_mask = [], [], mask.new_ones(video_embeds.shape[1])
        for b, p in enumerate(where.float().argmax(1).tolist()):
            embeds.append(torch.cat([text[b, :p], video_embeds[b], text[b, p + 1:]]))
            masks.append(torch.cat([mask[b, :p], video_mask, mask[b, p + 1:]]))
        return torch.stack(embeds), torch.stack(masks)

    def forward(self, input_ids, pixel_values, attention_mask=None):
        """ids (B, L) with one IMAGE_TOKEN_INDEX per row, pixels (B, T, 3, H, W) -> logits (B, L-1+Q, V)."""
        x, mask = self.embed(input_ids, self.encode_video(pixel_values), attention_mask)
        return self.language_model.logits(self.language_model.model(x, mask))


def _init_weights(m):
    """GPT-style init for models trained from scratch (the synthetic task); loading overwrites it."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, Resampler):
        nn.init.normal_(m.latents, std=0.02)


# ----------------------------------------------------------------------------- LoRA
# Adapters on the decoder's seven linear layers a block: y = W x + b + (alpha / r) B A x, A (r, in) Kaiming-uniform,
# B (out, r) zeros, so fresh adapters change nothing. W and b stay the layer's, under their published names, frozen
# and held once (bf16 on a GPU); A and B are fp32. `adapters_off` gives back the frozen base: the GRPO reference.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    def __init__(self, base, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.weight, self.bias = base.in_features, base.out_features, base.weight, base.bias
        self.lora_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, self.in_features, device=self.weight.device), a=math.sqrt(5)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:  # the frozen base, exactly
            return y
        return y + (self.scale * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)).to(y.dtype)


def add_lora(model, rank, alpha):
    """Adapters on every decoder block's LORA_TARGETS; all else frozen but the connector. -> model"""
    model.requires_grad_(False).connector.requires_grad_(True)
    for parent in [m for layer in model.language_model.model.layers for m in (layer.self_attn, layer.mlp)]:
        for name in LORA_TARGETS:
            if hasattr(parent, name):
                setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


@contextlib.contextmanager
def adapters_off(model):
    """Within: `model` is its frozen base (a no-op for a model without adapters)."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        for m in adapters:
            m.enabled = False
        yield
    finally:
        for m in adapters:
            m.enabled = True


def merge_lora(state_dict, scale):
    """A state dict with adapters (keys ...lora_A, ...lora_B) -> the plain model's, W + scale B A, in fp32."""
    lora = lambda k, n: state_dict.get(k[:-len("weight")] + n) if k.endswith(".weight") else None
    return {k: v.float() + (scale * lora(k, "lora_B").float() @ lora(k, "lora_A").float() if lora(k, "lora_A") is not None else 0)
            for k, v in state_dict.items() if not k.endswith((".lora_A", ".lora_B"))}
