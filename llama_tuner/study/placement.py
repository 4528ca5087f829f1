"""Where a trial's layers and experts go on a GPU, and which configurations are too big to load.

On a GPU a trial is not given the layers the sampler proposes: the memory model places as many as fit
the budget (or what is free, if less) less the headroom and its own error, and for a mixture of experts
every layer with the fewest layers' experts in host memory. A configuration predicted far over the budget
is recorded as skipped instead of loaded.
"""

from __future__ import annotations

from dataclasses import replace

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.launcher import Launcher
from llama_tuner.model.info import ModelInfo
from llama_tuner.study.memory_model import MemoryModel
from llama_tuner.study.objectives import Limits
from llama_tuner.study.space import SearchSpace

SKIP_MARGIN_PRIOR, SKIP_MARGIN_FITTED = 0.15, 0.05


class Placement:
    """Places trials on the study's GPU with its memory model (see the module doc)."""

    def __init__(self, *, memory: MemoryModel, space: SearchSpace, limits: Limits, launcher: Launcher,
                 model: ModelInfo):
        self.memory, self.space, self.limits, self.launcher, self.model = memory, space, limits, launcher, model

    def start_point(self, defaults: BenchConfig | None) -> BenchConfig | None:
        """On a GPU, the first sampled point: llama.cpp's defaults at ``--min-ctx`` (its own default,
        the training context, seldom fits a consumer card), with the least quantized KV cache that
        lets every layer fit. It anchors the sampler where the fast configurations are."""
        if not self.space.fit_layers or defaults is None:
            return None
        base, limit = replace(defaults, n_ctx=self.limits.min_ctx, flash_attn=True), self.limit()
        for kv in ("f16", "q8_0", "q4_0"):
            cfg = replace(base, type_k=kv, type_v=kv)
            if self.memory.max_layers(cfg, limit) == self.model.n_gpu_layers_all:
                return cfg
        return base

    def fit(self, cfg: BenchConfig) -> BenchConfig:
        """``cfg`` placed to fit the budget, or what is free if less, and the headroom, by the memory model
        (less its own error): the most layers, and for a MoE every layer with the fewest layers' experts
        in host memory (unless ``n_cpu_moe`` is pinned or searched); unchanged when nothing fits, so that it
        is skipped as too big."""
        limit = self.limit()
        if self.space.fit_experts:
            return self.memory.fit_placement(cfg, limit) or cfg
        ngl = self.memory.max_layers(cfg, limit)
        return cfg if ngl is None else replace(cfg, n_gpu_layers=ngl)

    def limit(self) -> int:
        """The predicted peak a fitted trial may reach: the budget (or what is free, if less) less the
        headroom and the memory model's own error."""
        budget = self.limits.budget_bytes
        free = self.launcher.gpu_free_bytes()
        room = min(budget, free) if free is not None else budget
        return room - self.limits.min_headroom_bytes - self.memory.uncertainty(budget)

    def too_big(self, predicted: int) -> bool:
        """True when even a generous error of the memory model would not bring the config within budget."""
        margin = SKIP_MARGIN_FITTED if self.memory.correction is not None else SKIP_MARGIN_PRIOR
        return predicted > self.limits.budget_bytes * (1 + margin)
