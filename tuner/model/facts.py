"""What the study, the memory model and the reports need of a model, kept once the study exists.

A study stores these facts (the model file may move or vanish afterwards); the
memory model predicts from them, and the bandwidth and compare figures count the
bytes one generated token reads with :meth:`ModelFacts.token_cost`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from tuner.model.info import KV_CACHE_TYPES, ModelInfo, cache_type_bytes


@dataclass(frozen=True, kw_only=True)
class TokenCost:
    """Bytes one generated token reads, split by where they live."""

    gpu_weights: int
    cpu_weights: int
    kv: int
    offloaded_layers: int
    n_layer: int

    @property
    def total(self) -> int:
        """All bytes read per token."""
        return self.gpu_weights + self.cpu_weights + self.kv


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """A model's shapes and bytes, from its GGUF header (see :class:`tuner.model.info.ModelInfo`)."""

    architecture: str
    quant: str
    name: str
    n_params: int
    file_size: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int  # the largest head count of any layer
    n_vocab: int
    n_swa: int  # the sliding window (0: none)
    swa_layers: list[int]
    layer_bytes: list[int]  # weights of each repeating layer
    output_bytes: int
    token_embd_bytes: int
    tied_embeddings: bool
    k_layer_bytes: dict[str, list[int]]  # cache type -> K bytes of one cell, per layer
    v_layer_bytes: dict[str, list[int]]

    @classmethod
    def of(cls, model: ModelInfo) -> "ModelFacts":
        """The facts of a model read from its header."""
        per_layer = {dim: {t: [cache_type_bytes(t, hd * model.n_head_kv[il]) for il in range(model.n_layer)]
                           for t in KV_CACHE_TYPES}
                     for dim, hd in (("k_layer_bytes", model.head_dim_k), ("v_layer_bytes", model.head_dim_v))}
        return cls(architecture=model.architecture, quant=model.quant, name=model.name, n_params=model.n_params,
                   file_size=model.file_size, n_layer=model.n_layer, n_embd=model.n_embd, n_ff=model.n_ff,
                   n_head=max(model.n_head), n_vocab=model.n_vocab, n_swa=model.n_swa or 0,
                   swa_layers=list(model.swa_layers), layer_bytes=list(model.layer_bytes),
                   output_bytes=model.output_bytes, token_embd_bytes=model.token_embd_bytes,
                   tied_embeddings=model.tied_embeddings, **per_layer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored on a study."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelFacts":
        """Facts stored on a study; keys that older versions also stored (``kv_bytes_per_token``) are ignored.

        Raises:
            KeyError: a field is missing (the study was not made by llama-tuner).
        """
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def first_gpu_layer(self, n_gpu_layers: int) -> int:
        """The first repeating layer on the GPU: llama.cpp offloads the output layer first, then the last
        repeating layers, so layer i is on the GPU when i >= n_layer + 1 - n_gpu_layers."""
        return max(0, self.n_layer + 1 - n_gpu_layers)

    def kv_cell_bytes(self, type_k: str, type_v: str, layers: list[int]) -> int:
        """K and V bytes of one cache cell, summed over ``layers``."""
        k, v = self.k_layer_bytes[type_k], self.v_layer_bytes[type_v]
        return sum(k[il] + v[il] for il in layers)

    def token_cost(self, n_gpu_layers: int, type_k: str, type_v: str, depth: float) -> TokenCost:
        """Bytes one generated token reads at ``depth`` tokens of context: every weight of every layer once,
        the output matrix, and the KV cache up to the depth (a sliding-window layer's up to its window)."""
        first_gpu = self.first_gpu_layer(n_gpu_layers)
        layers = self.layer_bytes
        gpu = sum(layers[first_gpu:]) + (self.output_bytes if n_gpu_layers > 0 else 0)
        cpu = sum(layers[:first_gpu]) + (0 if n_gpu_layers > 0 else self.output_bytes)
        swa = set(self.swa_layers)
        full_layers = [il for il in range(self.n_layer) if il not in swa]
        swa_depth = min(depth, self.n_swa) if self.n_swa else depth
        kv = (self.kv_cell_bytes(type_k, type_v, full_layers) * depth
              + self.kv_cell_bytes(type_k, type_v, sorted(swa)) * swa_depth)
        return TokenCost(gpu_weights=gpu, cpu_weights=cpu, kv=int(kv),
                         offloaded_layers=max(0, self.n_layer - first_gpu), n_layer=self.n_layer)
