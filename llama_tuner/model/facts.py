"""What the study, the memory model and the reports need of a model, kept once the study exists.

A study stores these facts (the model file may move or vanish afterwards); the
memory model predicts from them, and the bandwidth and compare figures count the
bytes one generated token reads with :meth:`ModelFacts.token_cost`.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from llama_tuner.model.info import KV_CACHE_TYPES, ModelInfo, cache_type_bytes


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
    """A model's shapes and bytes, from its GGUF header (see :class:`llama_tuner.model.info.ModelInfo`)."""

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
    n_expert: int = 0  # mixture of experts: experts per layer, and how many a token uses
    n_expert_used: int = 0
    expert_bytes: list[int] = field(default_factory=list)  # per layer: its routed experts (part of layer_bytes)

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
                   tied_embeddings=model.tied_embeddings, n_expert=model.n_expert,
                   n_expert_used=model.n_expert_used, expert_bytes=list(model.expert_bytes), **per_layer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored on a study."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelFacts":
        """Facts stored on a study; keys that older versions also stored (``kv_bytes_per_token``) are ignored,
        and those they lacked (the experts) take their defaults.

        Raises:
            KeyError: a field is missing (the study was not made by llama-tuner).
        """
        return cls(**{f.name: data[f.name] for f in fields(cls)
                      if f.name in data or (f.default is MISSING and f.default_factory is MISSING)})

    def host_expert_bytes(self, n_gpu_layers: int, n_cpu_moe: int) -> int:
        """Expert bytes that ``--n-cpu-moe`` keeps in host memory out of the offloaded layers (those of the
        layers below ``n_cpu_moe`` that would otherwise be on the GPU)."""
        first_gpu = self.first_gpu_layer(n_gpu_layers)
        return sum(self.expert_bytes[first_gpu:max(first_gpu, min(n_cpu_moe, self.n_layer))])

    def read_bytes(self, il: int) -> float:
        """Weight bytes layer ``il`` reads per generated token: all of a dense layer; of a MoE layer, its
        other tensors and the ``n_expert_used`` experts of ``n_expert`` the router picks."""
        experts = self.expert_bytes[il] if self.expert_bytes else 0
        used = experts * self.n_expert_used / self.n_expert if self.n_expert else experts
        return self.layer_bytes[il] - experts + used

    def first_gpu_layer(self, n_gpu_layers: int) -> int:
        """The first repeating layer on the GPU: llama.cpp offloads the output layer first, then the last
        repeating layers, so layer i is on the GPU when i >= n_layer + 1 - n_gpu_layers."""
        return max(0, self.n_layer + 1 - n_gpu_layers)

    def kv_cell_bytes(self, type_k: str, type_v: str, layers: list[int]) -> int:
        """K and V bytes of one cache cell, summed over ``layers``."""
        k, v = self.k_layer_bytes[type_k], self.v_layer_bytes[type_v]
        return sum(k[il] + v[il] for il in layers)

    def token_cost(self, n_gpu_layers: int, type_k: str, type_v: str, depth: float,
                   n_cpu_moe: int = 0) -> TokenCost:
        """Bytes one generated token reads at ``depth`` tokens of context: every weight of every layer once
        (of a MoE layer, the experts used), the output matrix, and the KV cache up to the depth (a
        sliding-window layer's up to its window); experts kept in host memory (``n_cpu_moe``) count as CPU."""
        first_gpu = self.first_gpu_layer(n_gpu_layers)
        read = [self.read_bytes(il) for il in range(self.n_layer)]
        moved = 0.0
        if self.n_expert and n_cpu_moe:
            moved = sum(self.expert_bytes[il] * self.n_expert_used / self.n_expert
                        for il in range(first_gpu, min(n_cpu_moe, self.n_layer)))
        gpu = sum(read[first_gpu:]) - moved + (self.output_bytes if n_gpu_layers > 0 else 0)
        cpu = sum(read[:first_gpu]) + moved + (0 if n_gpu_layers > 0 else self.output_bytes)
        swa = set(self.swa_layers)
        full_layers = [il for il in range(self.n_layer) if il not in swa]
        swa_depth = min(depth, self.n_swa) if self.n_swa else depth
        kv = (self.kv_cell_bytes(type_k, type_v, full_layers) * depth
              + self.kv_cell_bytes(type_k, type_v, sorted(swa)) * swa_depth)
        return TokenCost(gpu_weights=int(gpu), cpu_weights=int(cpu), kv=int(kv),
                         offloaded_layers=max(0, self.n_layer - first_gpu), n_layer=self.n_layer)
