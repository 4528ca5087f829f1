"""Write random-weight GGUF files with real shapes and llama.cpp's real quant mixes.

Speed and memory of llama.cpp depend on tensor shapes and types, not on weight
values, so a "twin" of a model measures like the model. Blocks are random bytes
with their fp16 scale fields set to a small finite value, so every weight is a
finite number and no NaN can slow a kernel down. The per-tensor type choice
follows llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) for the
dense, non-Falcon case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from llama_tuner.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The hyper-parameters that fix every tensor's shape."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int = 4096
    rope_base: float = 10000.0
    tied: bool = False
    n_expert: int = 0  # mixture of experts: experts per layer (0: a dense model)
    n_expert_used: int = 0
    n_ff_exp: int = 0  # each expert's feed-forward width


TWIN_KEY = "llama_tuner.twin"  # marks a file written by write_synthetic_gguf

# The command-line flag of each shape field (``synth`` builds its options from this, and errors name them).
SHAPE_FLAGS = {"n_layer": "--layers", "n_embd": "--embd", "n_head": "--heads", "n_head_kv": "--kv-heads",
               "head_dim": "--head-dim", "n_ff": "--ffn", "n_vocab": "--vocab", "n_ctx_train": "--ctx",
               "n_expert": "--experts", "n_expert_used": "--experts-used", "n_ff_exp": "--expert-ffn"}

SHAPES: dict[str, Shape] = {
    "tiny": Shape(arch="llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=1024,
                  n_ctx_train=4096),
    "small": Shape(arch="llama", n_layer=4, n_embd=512, n_head=8, n_head_kv=4, head_dim=64, n_ff=1536, n_vocab=4096,
                   n_ctx_train=8192),
    "qwen3-8b": Shape(arch="qwen3", n_layer=36, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=12288,
                      n_vocab=151936, n_ctx_train=40960, rope_base=1e6),
    "mistral-small-24b": Shape(arch="llama", n_layer=40, n_embd=5120, n_head=32, n_head_kv=8, head_dim=128,
                               n_ff=32768, n_vocab=131072, n_ctx_train=32768, rope_base=1e8),
    # Qwen3-30B-A3B: 48 layers of 128 experts, 8 used per token (config.json of Qwen/Qwen3-30B-A3B).
    "qwen3-30b-a3b": Shape(arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
                           n_ff=6144, n_vocab=151936, n_ctx_train=40960, rope_base=1e6, n_expert=128,
                           n_expert_used=8, n_ff_exp=768),
    # A small MoE for CPU tests: 4 layers of 8 experts, 2 used.
    "tiny-moe": Shape(arch="qwen3moe", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512,
                      n_vocab=1024, n_ctx_train=4096, n_expert=8, n_expert_used=2, n_ff_exp=256),
}

QUANTS: dict[str, LlamaFileType] = {
    "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0, "q6_k": LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M, "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q2_k": LlamaFileType.MOSTLY_Q2_K,
}
_BASE_TYPE = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q6_k": "Q6_K",
              "q5_k_m": "Q5_K", "q4_k_m": "Q4_K", "q2_k": "Q2_K"}
# Byte offsets of the fp16 scale fields inside one block of each type.
_FP16_FIELDS = {"Q4_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                "Q2_K": (80, 82), "Q3_K": (108,), "Q6_K": (208,)}
_SCALE = np.frombuffer(np.float16(1e-4).tobytes(), dtype=np.uint8)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: name, ggml type name and dims in ggml order (ne0 first)."""

    name: str
    type_name: str
    shape: tuple[int, ...]

    @property
    def n_bytes(self) -> int:
        """Size of the tensor's data in the file."""
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.type_name]]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


def _more_bits(il: int, n: int) -> bool:
    return il < n // 8 or il >= 7 * n // 8 or (il - n // 8) % 3 == 2


def tensor_type(quant: str, role: str, il: int, shape: Shape) -> str:
    """The ggml type llama.cpp's quantizer gives tensor ``role`` of layer ``il``."""
    base = _BASE_TYPE[quant]
    if role == "output" or (role == "token_embd" and shape.tied):
        return base if base in ("F16", "Q8_0") else "Q6_K"
    if role == "token_embd":
        return base
    gqa = shape.n_head // shape.n_head_kv
    if quant == "q2_k":
        return {"attn_v": "Q4_K" if gqa >= 4 else "Q3_K", "ffn_down": "Q3_K", "attn_output": "Q3_K"}.get(role, base)
    if quant in ("q4_k_m", "q5_k_m") and role in ("attn_v", "ffn_down") and _more_bits(il, shape.n_layer):
        return "Q6_K"
    return base


def _fit(type_name: str, ne0: int) -> str:
    """Fall back to a type whose block divides the row, as llama.cpp's quantizer does."""
    block = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
    if ne0 % block == 0:
        return type_name
    return "Q8_0" if ne0 % 32 == 0 else "F16"


def plan_tensors(shape: Shape, quant: str) -> list[PlannedTensor]:
    """Every tensor of a ``shape`` model quantized as ``quant``, in file order.

    Raises:
        UserError: an unknown quant type.
    """
    if quant not in QUANTS:
        raise UserError(f"unknown quant {quant!r}", f"use one of {', '.join(QUANTS)}")
    e, hd, v = shape.n_embd, shape.head_dim, shape.n_vocab
    q_dim, kv_dim = shape.n_head * hd, shape.n_head_kv * hd

    def mat(name: str, role: str, il: int, ne0: int, ne1: int) -> PlannedTensor:
        return PlannedTensor(name, _fit(tensor_type(quant, role, il, shape), ne0), (ne0, ne1))

    out = [mat("token_embd.weight", "token_embd", 0, e, v), PlannedTensor("output_norm.weight", "F32", (e,))]
    if not shape.tied:
        out.append(mat("output.weight", "output", 0, e, v))
    for il in range(shape.n_layer):
        p = f"blk.{il}."
        out.append(PlannedTensor(p + "attn_norm.weight", "F32", (e,)))
        out += [mat(p + "attn_q.weight", "attn_q", il, e, q_dim), mat(p + "attn_k.weight", "attn_k", il, e, kv_dim),
                mat(p + "attn_v.weight", "attn_v", il, e, kv_dim),
                mat(p + "attn_output.weight", "attn_output", il, q_dim, e)]
        if shape.arch in ("qwen3", "qwen3moe"):
            out += [PlannedTensor(p + "attn_q_norm.weight", "F32", (hd,)),
                    PlannedTensor(p + "attn_k_norm.weight", "F32", (hd,))]
        out.append(PlannedTensor(p + "ffn_norm.weight", "F32", (e,)))
        if shape.n_expert:  # the router (never quantized), then every expert's gate, up and down in one tensor each
            x, f = shape.n_expert, shape.n_ff_exp
            out += [PlannedTensor(p + "ffn_gate_inp.weight", "F32", (e, x)),
                    PlannedTensor(p + "ffn_gate_exps.weight", _fit(tensor_type(quant, "ffn_gate", il, shape), e),
                                  (e, f, x)),
                    PlannedTensor(p + "ffn_up_exps.weight", _fit(tensor_type(quant, "ffn_up", il, shape), e),
                                  (e, f, x)),
                    PlannedTensor(p + "ffn_down_exps.weight", _fit(tensor_type(quant, "ffn_down", il, shape), f),
                                  (f, e, x))]
            continue
        out += [mat(p + "ffn_gate.weight", "ffn_gate", il, e, shape.n_ff),
                mat(p + "ffn_up.weight", "ffn_up", il, e, shape.n_ff),
                mat(p + "ffn_down.weight", "ffn_down", il, shape.n_ff, e)]
    return out


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, then fillers."""
    if n_vocab < 259 + 1:
        raise UserError(f"vocab {n_vocab} is too small", "use --vocab 260 or more")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(n_vocab - 259)]
    return tokens, scores, types


class _RandomBytes:
    """Cycles through one pool of random bytes; values do not matter, only speed."""

    def __init__(self, seed: int, size: int = 1 << 24):
        self.pool = np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)
        self.start = 0

    def take(self, n: int) -> np.ndarray:
        reps = -(-(n + self.start) // self.pool.size)
        window = slice(self.start, self.start + n)
        out = np.tile(self.pool, reps)[window] if reps > 1 else self.pool[window].copy()
        self.start = (self.start + 7919) % self.pool.size
        return out


def _tensor_data(t: PlannedTensor, rnd: _RandomBytes) -> np.ndarray:
    if t.type_name == "F32":
        return np.ones(t.shape[::-1], dtype=np.float32)
    if t.type_name == "F16":
        raw = (rnd.take(t.n_bytes // 2 * 2).view(np.int8).astype(np.float16) * np.float16(2e-4))
        return raw.reshape(t.shape[::-1])
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[t.type_name]][1]
    data = rnd.take(t.n_bytes).reshape(-1, block_bytes)
    for off in _FP16_FIELDS[t.type_name]:
        data[:, off:off + 2] = _SCALE
    return data.reshape(*t.shape[:0:-1], -1) if len(t.shape) >= 2 else data.reshape(-1)


def _tensor_iter(planned: list[PlannedTensor], seed: int) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    rnd = _RandomBytes(seed)
    for t in planned:
        yield t, _tensor_data(t, rnd)


def write_synthetic_gguf(path: str | os.PathLike, shape: Shape, quant: str, seed: int = 0,
                         name: str | None = None, progress: Callable[[int, int], None] | None = None, *,
                         shards: int = 1) -> Path:
    """Write a random-weight GGUF of ``shape`` and ``quant`` to ``path`` (atomically), and return its path.

    With ``shards`` > 1 it is a split GGUF as llama.cpp's gguf-split writes one: up to ``shards`` files
    ``STEM-00001-of-0000N.gguf`` ... beside ``path``, the first with all the metadata, each with its share of
    the tensors and the keys split.no, split.count and split.tensors.count; the first shard's path is returned.

    Raises:
        UserError: an unknown quant type.
    """
    planned = plan_tensors(shape, quant)
    out = Path(path)
    per_shard = -(-len(planned) // shards) if shards > 1 else 0
    staging = out.parent / f".{out.name}.part" if per_shard else None
    if staging is not None:
        staging.mkdir(exist_ok=True)
    tmp = staging / out.name if staging is not None else out.with_name(out.name + ".part")
    arch = shape.arch
    w = GGUFWriter(tmp, arch, split_max_tensors=per_shard)
    w.add_name(name or f"synthetic {arch} {shape.n_layer}L {quant}")
    w.add_file_type(int(QUANTS[quant]))
    w.add_quantization_version(2)
    w.add_string(TWIN_KEY, "random weights: shapes and types of a real model, no quality to measure")
    w.add_uint32(f"{arch}.block_count", shape.n_layer)
    w.add_uint32(f"{arch}.context_length", shape.n_ctx_train)
    w.add_uint32(f"{arch}.embedding_length", shape.n_embd)
    w.add_uint32(f"{arch}.feed_forward_length", shape.n_ff)
    w.add_uint32(f"{arch}.attention.head_count", shape.n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", shape.n_head_kv)
    w.add_uint32(f"{arch}.attention.key_length", shape.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", shape.head_dim)
    w.add_float32(f"{arch}.rope.freq_base", shape.rope_base)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if shape.n_expert:
        w.add_uint32(f"{arch}.expert_count", shape.n_expert)
        w.add_uint32(f"{arch}.expert_used_count", shape.n_expert_used)
        w.add_uint32(f"{arch}.expert_feed_forward_length", shape.n_ff_exp)
    tokens, scores, types = _vocab(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for t in planned:
        dtype = np.float32 if t.type_name == "F32" else np.float16 if t.type_name == "F16" else np.uint8
        byte_shape = t.shape[::-1]
        if dtype == np.uint8:  # rows of bytes: the outer dims as they are, the row (ne0) as its bytes
            rows = t.shape[:0:-1] or (1,)
            byte_shape = (*rows, t.n_bytes // int(np.prod(rows)))
        raw = None if dtype != np.uint8 else GGMLQuantizationType[t.type_name]
        w.add_tensor_info(t.name, byte_shape, np.dtype(dtype), t.n_bytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    done = 0
    total = sum(t.n_bytes for t in planned)
    for t, data in _tensor_iter(planned, seed):
        w.write_tensor_data(data)
        done += t.n_bytes
        if progress:
            progress(done, total)
    w.close()
    if staging is None:
        os.replace(tmp, out)
        return out
    written = sorted(staging.iterdir())
    for f in written:
        os.replace(f, out.with_name(f.name))
    staging.rmdir()
    return out.with_name(written[0].name)


def describe_shape(shape: Shape, quant: str, name: str = "twin.gguf"):
    """The ModelInfo a written twin would have, without writing it (for plans of multi-GB twins)."""
    from llama_tuner.model.gguf_header import GGUFHeader, LongArray, TensorInfo
    from llama_tuner.model.info import model_info_from_header

    tensors, offset = [], 0
    for t in plan_tensors(shape, quant):
        tensors.append(TensorInfo(name=t.name, type_name=t.type_name, shape=t.shape, offset=offset,
                                  n_bytes=t.n_bytes))
        offset += t.n_bytes
    a = shape.arch
    metadata = {"general.architecture": a, "general.name": name, "general.file_type": int(QUANTS[quant]),
                f"{a}.block_count": shape.n_layer, f"{a}.context_length": shape.n_ctx_train,
                f"{a}.embedding_length": shape.n_embd, f"{a}.feed_forward_length": shape.n_ff,
                f"{a}.attention.head_count": shape.n_head, f"{a}.attention.head_count_kv": shape.n_head_kv,
                f"{a}.attention.key_length": shape.head_dim, f"{a}.attention.value_length": shape.head_dim,
                "tokenizer.ggml.tokens": LongArray("STRING", shape.n_vocab)}
    if shape.n_expert:
        metadata.update({f"{a}.expert_count": shape.n_expert, f"{a}.expert_used_count": shape.n_expert_used,
                         f"{a}.expert_feed_forward_length": shape.n_ff_exp})
    header = GGUFHeader(version=3, metadata=metadata, tensors=tensors, data_offset=0, file_size=offset)
    return model_info_from_header(name, header)


def resolve_shape(like: str | None, **overrides: int | str | None) -> Shape:
    """A named shape with any given fields replaced, or a custom one from fields alone.

    Raises:
        UserError: an unknown named shape, or a custom one missing fields (named by their flags).
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if like is not None:
        if like not in SHAPES:
            raise UserError(f"unknown model shape {like!r}", f"use --like with one of {', '.join(SHAPES)}")
        return replace(SHAPES[like], **given)
    needed = ("n_layer", "n_embd", "n_head", "n_ff", "n_vocab")
    missing = [k for k in needed if k not in given]
    if missing:
        flags = ", ".join(SHAPE_FLAGS[k] for k in missing)
        raise UserError(f"a custom shape needs {flags}", "give them, or use --like NAME")
    given.setdefault("arch", "llama")
    given.setdefault("n_head_kv", given["n_head"])
    given.setdefault("head_dim", int(given["n_embd"]) // int(given["n_head"]))
    return Shape(**given)
