"""What a GGUF model is, from its header: shapes, quant types, and memory per part.

Everything the study and the memory model need to know about a model before
loading it: layers, heads, head dims, sliding-window layers, the bytes of each
repeating layer, of the output and of the token embedding, and the KV-cache bytes
per token for each cache type.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llama_tuner.errors import UserError
from llama_tuner.model.experts import is_expert_tensor
from llama_tuner.model.gguf_header import GGUFHeader, LongArray, read_gguf_header

# KV cache types llama.cpp accepts for --cache-type-k/-v.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# Sliding-window layer patterns that llama.cpp applies per architecture when the
# GGUF has `sliding_window` but no `sliding_window_pattern` key (src/models/*.cpp):
# (n_pattern, dense_first).
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False),
    "gemma-embedding": (6, False), "cohere2": (4, False), "exaone4": (4, False),
    "llama4": (4, False), "olmo2": (4, False), "gpt-oss": (2, False),
    "smallthinker": (4, True), "afmoe": (4, False), "plamo3": (8, False),
}


def cache_type_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes that ``n_elements`` values take in a KV cache of ``cache_type``.

    Raises:
        UserError: an unknown cache type.
    """
    if cache_type not in KV_CACHE_TYPES:
        raise UserError(f"unknown KV cache type {cache_type!r}", f"use one of {', '.join(KV_CACHE_TYPES)}")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
    return -(-n_elements // block) * size


def swa_layer_flags(arch: str, n_layer: int, n_swa: int, pattern: Any) -> list[bool]:
    """Which layers use sliding-window attention, as llama.cpp's set_swa_pattern decides."""
    if n_swa <= 0:
        return [False] * n_layer
    if isinstance(pattern, list):
        return [bool(x) for x in pattern[:n_layer]] + [False] * max(0, n_layer - len(pattern))
    n_pattern, dense_first = SWA_PATTERNS.get(arch, (None, False))
    if isinstance(pattern, int):
        n_pattern = pattern
    if n_pattern is None:
        return [False] * n_layer
    if dense_first:
        return [n_pattern == 0 or i % n_pattern != 0 for i in range(n_layer)]
    return [n_pattern == 0 or i % n_pattern < n_pattern - 1 for i in range(n_layer)]


def _per_layer(value: Any, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]]
    return [int(value)] * n_layer


@dataclass(kw_only=True)
class ModelInfo:
    """A GGUF model described from its header alone (no weights are read); a split GGUF from the headers of
    all its shards (``file_size`` is theirs together)."""

    path: str
    file_size: int
    architecture: str
    name: str
    quant: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: list[int]
    n_head_kv: list[int]
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int
    n_swa: int
    swa_layers: list[int]
    n_params: int
    tensor_types: dict[str, int]
    layer_bytes: list[int]
    output_bytes: int
    token_embd_bytes: int
    tied_embeddings: bool
    n_expert: int = 0  # mixture of experts: experts per layer (0: dense)
    n_expert_used: int = 0  # experts each token runs through
    n_expert_shared: int = 0  # experts every token runs through besides those (shared experts)
    expert_bytes: list[int] = field(default_factory=list)  # per layer: the routed experts' tensors (ffn_*_exps)
    files: list[str] = field(default_factory=list)  # what llama.cpp reads: the file, or every shard of a split GGUF
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        """Base name of the model file."""
        return os.path.basename(self.path)

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model (expert tensors in its layers)."""
        return self.n_expert > 0 and any(self.expert_bytes)

    def expert_tensors(self, n_cpu_moe: int) -> dict[str, int]:
        """The tensors ``--n-cpu-moe n_cpu_moe`` keeps in host memory (those of the first N layers that match
        llama.cpp's LLM_FFN_EXPS_REGEX), with their bytes."""
        return {t.name: t.n_bytes for t in self.extra.get("tensors", [])
                if is_expert_tensor(t.name) and int(t.name.split(".")[1]) < n_cpu_moe}

    @property
    def n_gpu_layers_all(self) -> int:
        """The ``n_gpu_layers`` value that offloads every layer and the output (n_layer + 1)."""
        return self.n_layer + 1

    def kv_bytes_per_token(self, type_k: str = "f16", type_v: str = "f16", swa: bool | None = None) -> int:
        """KV-cache bytes one token takes: all layers, or only the SWA (True) / full (False) ones."""
        total = 0
        for il in range(self.n_layer):
            if swa is not None and (il in self.swa_layers) != swa:
                continue
            total += cache_type_bytes(type_k, self.head_dim_k * self.n_head_kv[il])
            total += cache_type_bytes(type_v, self.head_dim_v * self.n_head_kv[il])
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, including KV bytes per token for common cache types."""
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d["expert_bytes_total"] = sum(self.expert_bytes)
        d["file_name"] = self.file_name
        d["kv_bytes_per_token"] = {
            t: {"all": self.kv_bytes_per_token(t, t), "full_attention": self.kv_bytes_per_token(t, t, swa=False),
                "sliding_window": self.kv_bytes_per_token(t, t, swa=True)}
            for t in ("f16", "q8_0", "q4_0")
        }
        return d


def _file_type_name(metadata: dict[str, Any], counts: Counter) -> str:
    ftype = metadata.get("general.file_type")
    try:
        return LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else counts.most_common(1)[0][0]
    except ValueError:
        return f"ftype{ftype}"


def model_info_from_header(path: str, header: GGUFHeader) -> ModelInfo:
    """Build a ModelInfo from a parsed header; UserError if essential keys are missing.

    Raises:
        UserError: a key llama.cpp needs is missing from the header.
    """
    md = header.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path} has no general.architecture key", "it is not a llama.cpp model file")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if required and value is None:
            raise UserError(f"{path} lacks the {arch}.{name} key", "re-convert it with a current llama.cpp")
        return value

    n_layer = int(key("block_count", required=True))
    n_embd = int(key("embedding_length", required=True))
    n_head = _per_layer(key("attention.head_count", required=True), n_layer)
    n_head_kv = _per_layer(key("attention.head_count_kv", n_head), n_layer)
    head0 = max(n_head) or 1
    head_dim_k = int(key("attention.key_length", n_embd // head0))
    head_dim_v = int(key("attention.value_length", head_dim_k))
    n_swa = int(key("attention.sliding_window", 0) or 0)
    swa_flags = swa_layer_flags(arch, n_layer, n_swa, key("attention.sliding_window_pattern"))
    tokens = md.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, LongArray) else len(tokens or [])
    n_vocab = int(key("vocab_size", n_vocab) or n_vocab)

    layer_bytes, expert_bytes = [0] * n_layer, [0] * n_layer
    by_name = {t.name: t for t in header.tensors}
    for t in header.tensors:
        if t.name.startswith("blk."):
            il = int(t.name.split(".")[1])
            if il < n_layer:
                layer_bytes[il] += t.n_bytes
                if is_expert_tensor(t.name):
                    expert_bytes[il] += t.n_bytes
    embd = by_name.get("token_embd.weight")
    tied = "output.weight" not in by_name
    output_bytes = sum(t.n_bytes for n, t in by_name.items() if n.startswith("output"))
    if tied and embd is not None:
        output_bytes += embd.n_bytes  # llama.cpp duplicates the tied matrix for the output layer
    counts = Counter(t.type_name for t in header.tensors)
    ff = key("feed_forward_length", 0)
    return ModelInfo(
        path=str(path), file_size=header.file_size, architecture=arch,
        name=str(md.get("general.name", Path(path).stem)), quant=_file_type_name(md, counts),
        n_layer=n_layer, n_embd=n_embd, n_ff=max(ff) if isinstance(ff, list) else int(ff),
        n_head=n_head, n_head_kv=n_head_kv, head_dim_k=head_dim_k, head_dim_v=head_dim_v,
        n_ctx_train=int(key("context_length", 0) or 0), n_vocab=n_vocab, n_swa=n_swa,
        swa_layers=[i for i, f in enumerate(swa_flags) if f],
        n_params=sum(t.n_elements for t in header.tensors), tensor_types=dict(counts),
        layer_bytes=layer_bytes, output_bytes=output_bytes,
        token_embd_bytes=embd.n_bytes if embd else 0, tied_embeddings=tied,
        n_expert=int(key("expert_count", 0) or 0), n_expert_used=int(key("expert_used_count", 0) or 0),
        n_expert_shared=int(key("expert_shared_count", 0) or 0), expert_bytes=expert_bytes,
        files=list(header.files),
        extra={"tensors": header.tensors, "chat_template": "tokenizer.chat_template" in md,
               "twin": "llama_tuner.twin" in md or str(md.get("general.name", "")).startswith("synthetic ")},
    )


def load_model_info(path: str | os.PathLike) -> ModelInfo:
    """Read the GGUF header at ``path`` (of every shard, for the first shard of a split GGUF) and describe the
    model; UserError on a bad file.

    Raises:
        UserError: see :func:`llama_tuner.model.gguf_header.read_gguf_header`.
    """
    return model_info_from_header(str(path), read_gguf_header(path))
