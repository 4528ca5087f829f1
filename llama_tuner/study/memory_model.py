"""Memory before loading: predict a configuration's peak VRAM (or RAM) from the GGUF header.

The prediction adds what llama.cpp allocates on the limiting device:

- weights: the output layer and the last ``n_gpu_layers - 1`` repeating layers go to
  the GPU (llama.cpp's offload order); the rest, and the token embedding, stay in RAM;
  so do the expert tensors of the first ``n_cpu_moe`` layers of a mixture of experts;
- KV cache: per layer and token (``ModelInfo.kv_bytes_per_token``) for the context
  padded to 256 cells; sliding-window layers hold min(n_ctx, n_swa + n_ubatch) cells
  padded to 256 unless ``swa_full``; on the GPU for offloaded layers with offload_kqv;
- compute buffers: llama.cpp reserves a graph for ``n_ubatch`` tokens with every
  one an output, so the logits (n_ubatch x n_vocab x 4 bytes) dominate for large
  vocabularies, plus attention scores (without flash attention), the attention mask of every
  cell (f16 with flash attention, else f32) and FFN activations.
  Its coefficients are refitted from the compute buffers llama.cpp reports;
- a correction for what llama.cpp does not report (the CUDA context, the
  interpreter), refitted from every measured peak of the study as the median of
  measured minus predicted.
"""

from __future__ import annotations

import statistics
from dataclasses import KW_ONLY, dataclass, field, replace
import numpy as np

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import TrialResult
from llama_tuner.model.facts import ModelFacts

CELL_PAD = 256
FIT_MIN_CTX = 4096  # llama.cpp --fit-ctx: the least context --fit shrinks to
FIT_MARGIN = 1024 * 2**20  # llama.cpp --fit-target: memory --fit leaves free per device
DEFAULT_CORRECTION = {"gpu": 400 * 2**20, "host": 60 * 2**20}  # CUDA context / interpreter, before any fit


def _pad(n: int) -> int:
    return -(-n // CELL_PAD) * CELL_PAD


@dataclass(frozen=True, kw_only=True)
class Allocations:
    """Predicted allocations (bytes) per device."""

    gpu_weights: int
    host_weights: int
    gpu_kv: int
    host_kv: int
    gpu_compute: int
    host_compute: int
    gpu_layers: int

    def total(self, device: str) -> int:
        """Everything llama.cpp allocates on ``device`` ("gpu" or "host")."""
        if device == "gpu":
            return self.gpu_weights + self.gpu_kv + self.gpu_compute
        return self.host_weights + self.host_kv + self.host_compute


def compute_features(facts: ModelFacts, cfg: BenchConfig) -> np.ndarray:
    """The terms the compute buffer grows with: logits, attention scores, the attention mask, FFN, a constant."""
    ub, n_kv = cfg.n_ubatch, _pad(cfg.n_ctx)
    attn = 0 if cfg.flash_attn else ub * n_kv * facts.n_head * 4
    mask = ub * n_kv * (2 if cfg.flash_attn else 4)  # the KQ mask of every cell: f16 for flash attention, else f32
    return np.array([ub * facts.n_vocab * 4, attn, mask, ub * facts.n_ff * 4, 1.0], dtype=float)


PRIOR_COEFFS = np.array([1.0, 1.0, 1.0, 3.0, 2 * 2**20])


@dataclass
class MemoryModel:
    """Predicts peak memory; ``fit`` refines it from measured results of the same model."""

    facts: ModelFacts
    _: KW_ONLY
    on_gpu: bool
    coeffs: np.ndarray = field(default_factory=lambda: PRIOR_COEFFS.copy())
    correction: int | None = None
    residuals: list[float] = field(default_factory=list)
    prior_offset: int = 0  # llama.cpp's own account (a no_alloc dry run) less the formula, before any measurement

    @property
    def device(self) -> str:
        """The device whose memory limits the study."""
        return "gpu" if self.on_gpu else "host"

    def allocations(self, cfg: BenchConfig) -> Allocations:
        """Allocations of ``cfg`` per device."""
        f = self.facts
        n_layer, ngl = f.n_layer, cfg.n_gpu_layers if self.on_gpu else 0
        first_gpu = f.first_gpu_layer(ngl)
        layers = f.layer_bytes
        experts_home = f.host_expert_bytes(ngl, cfg.n_cpu_moe) if ngl > 0 and f.expert_bytes else 0
        gpu_w = sum(layers[first_gpu:]) + (f.output_bytes if ngl > 0 else 0) - experts_home
        # A tied output is the token embedding itself while it stays on the host.
        host_out = 0 if ngl > 0 or f.tied_embeddings else f.output_bytes
        host_w = sum(layers[:first_gpu]) + f.token_embd_bytes + host_out + experts_home
        kv_per_layer = self._kv_cells(cfg)
        gpu_kv = host_kv = 0
        for il in range(n_layer):
            size = kv_per_layer[il]
            if il >= first_gpu and cfg.offload_kqv and ngl > 0:
                gpu_kv += size
            else:
                host_kv += size
        compute = max(0.0, float(compute_features(f, cfg) @ self.coeffs))
        on_gpu_compute = ngl > 0
        return Allocations(gpu_weights=gpu_w, host_weights=host_w, gpu_kv=gpu_kv, host_kv=host_kv,
                    gpu_compute=int(compute) if on_gpu_compute else 0,
                    host_compute=0 if on_gpu_compute else int(compute), gpu_layers=max(0, n_layer - first_gpu))

    def _kv_cells(self, cfg: BenchConfig) -> list[int]:
        """KV bytes of each layer: its cells times its bytes per cell."""
        f = self.facts
        n_ctx = _pad(cfg.n_ctx)
        swa_cells = n_ctx if cfg.swa_full or not f.n_swa else _pad(min(n_ctx, f.n_swa + cfg.n_ubatch))
        swa = set(f.swa_layers)
        return [f.kv_cell_bytes(cfg.type_k, cfg.type_v, [il]) * (swa_cells if il in swa else n_ctx)
                for il in range(f.n_layer)]

    def predict(self, cfg: BenchConfig) -> int:
        """Predicted peak on the limiting device, including the fitted correction."""
        correction = self.correction if self.correction is not None else DEFAULT_CORRECTION[self.device]
        return self.allocations(cfg).total(self.device) + self.prior_offset + correction

    def calibrate(self, dry_runs: list[TrialResult]) -> list[tuple[int, int]]:
        """Take the prior from llama.cpp itself: dry runs (``no_alloc`` loads) report the KV cache and compute
        buffers a configuration would allocate (not the weights, which read 0 there; the header gives them
        exactly). Fit the compute coefficients to those buffers, and offset the formula by the median of the
        dry runs' KV and compute less the formula's. Returns (formula, dry run) bytes of KV and compute on the
        limiting device per dry run, for the docs."""
        dry = [r for r in dry_runs if r.ok and r.buffers]
        pairs_before = [self._kv_compute(r.config) for r in dry]
        self._fit_compute(dry)
        reported = [r.allocated_bytes(self.device, kinds=("kv", "compute")) for r in dry]
        formula = [self._kv_compute(r.config) for r in dry]
        if dry:
            self.prior_offset = int(statistics.median(d - f for f, d in zip(formula, reported)))
        return list(zip(pairs_before, reported))

    def _kv_compute(self, cfg: BenchConfig) -> int:
        a = self.allocations(cfg)
        return a.gpu_kv + a.gpu_compute if self.device == "gpu" else a.host_kv + a.host_compute

    def _fit_compute(self, results: list[TrialResult]) -> None:
        rows, targets = [], []
        for r in results:
            rows.append(compute_features(self.facts, r.config))
            targets.append(sum(r.buffers.get("compute", {}).values()))
        if len(rows) >= 4:
            x, y = np.array(rows), np.array(targets, dtype=float)
            scale = np.where(x.max(axis=0) > 0, x.max(axis=0), 1.0)
            sol, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
            self.coeffs = np.clip(sol / scale, 0, None)

    def max_layers(self, cfg: BenchConfig, limit: int) -> int | None:
        """The most layers (n_gpu_layers) with which ``cfg`` is predicted to stay within ``limit`` bytes
        on the GPU, or None when even none fit (the compute buffer or the context alone is too big)."""
        for ngl in range(self.facts.n_layer + 1, -1, -1):
            if self.predict(replace(cfg, n_gpu_layers=ngl)) <= limit:
                return ngl
        return None

    def fit_placement(self, cfg: BenchConfig, limit: int) -> BenchConfig | None:
        """``cfg`` placed to stay within ``limit`` bytes on the GPU as llama.cpp's --fit would place a MoE:
        every layer offloaded with the fewest layers' experts in host memory; only if even every expert in
        host memory does not fit, fewer layers (all experts kept in host memory). A dense model gets the most
        layers (:meth:`max_layers`). None when nothing fits."""
        f = self.facts
        if not (f.n_expert and any(f.expert_bytes)):
            ngl = self.max_layers(cfg, limit)
            return None if ngl is None else replace(cfg, n_gpu_layers=ngl)
        every = replace(cfg, n_gpu_layers=f.n_layer + 1)
        for n in range(0, f.n_layer + 1):
            if self.predict(replace(every, n_cpu_moe=n)) <= limit:
                return replace(every, n_cpu_moe=n)
        ngl = self.max_layers(replace(cfg, n_cpu_moe=f.n_layer), limit)
        return None if ngl is None else replace(cfg, n_gpu_layers=ngl, n_cpu_moe=f.n_layer)

    def fit_like_llama_server(self, cfg: BenchConfig, limit: int, min_ctx: int = FIT_MIN_CTX) -> BenchConfig:
        """What llama-server's --fit (on by default) makes of ``cfg``, the settings left at its defaults, for
        ``limit`` bytes on the GPU (free memory or the budget, less its 1024 MiB margin): the context shrinks
        from the training context towards ``min_ctx`` first, then a MoE's experts move to host memory layer by
        layer, then layers leave the GPU. ``cfg`` as far as it got when nothing fits."""
        if self.predict(cfg) <= limit:
            return cfg
        floor = min(min_ctx, cfg.n_ctx)
        fits = [n for n in range(cfg.n_ctx - CELL_PAD, floor - 1, -CELL_PAD)
                if self.predict(replace(cfg, n_ctx=n, n_batch=min(cfg.n_batch, n),
                                        n_ubatch=min(cfg.n_ubatch, n))) <= limit]
        n_ctx = fits[0] if fits else floor
        cfg = replace(cfg, n_ctx=n_ctx, n_batch=min(cfg.n_batch, n_ctx), n_ubatch=min(cfg.n_ubatch, n_ctx))
        if fits:
            return cfg
        return self.fit_placement(cfg, limit) or replace(cfg, n_gpu_layers=0)

    def uncertainty(self, budget: int) -> int:
        """Bytes to keep in reserve for the model's own error: 3% of the budget before any
        measurement; afterwards its typical error, the median distance of the residuals from
        the correction (at least 0.5% of the budget). Not the largest: the headroom already
        keeps a reserve, a trial that overshoots is one recorded infeasible trial, while too
        wide a margin would hide the best configuration (on the H200, the Mistral twin's
        16k context with f16 KV and all layers peaks 159 MiB under a 12 GiB budget's headroom)."""
        if self.correction is None or not self.residuals:
            return int(0.03 * budget)
        typical = statistics.median(abs(r - self.correction) for r in self.residuals)
        return int(max(0.005 * budget, typical))

    def fit(self, results: list[TrialResult]) -> None:
        """Refit the compute coefficients (from llama.cpp's buffers) and the correction (from peaks)."""
        ok = [r for r in results if r.ok and r.buffers]
        self._fit_compute(ok)
        measured = [(r, r.peak_memory_bytes) for r in ok if r.peak_memory_bytes]
        if measured:
            self.correction = 0
            self.residuals = [peak - self.predict(r.config) for r, peak in measured]
            self.correction = int(statistics.median(self.residuals))

    def errors(self, results: list[TrialResult]) -> list[float]:
        """Prediction error of each measured result, in % of its measured peak."""
        return [100 * (self.predict(r.config) - r.peak_memory_bytes) / r.peak_memory_bytes
                for r in results if r.ok and r.peak_memory_bytes]
