"""What a quantized KV cache does to the model's answers: next-token distributions against an f16 cache.

Run as ``python -m llama_tuner.measure.kv_quality`` with a JSON job on stdin (model path, cache
types, text, tokens, threads, repack); it prints one JSON object. Like the measuring child,
it is a process of its own that imports llama_cpp.

One model, one context per cache type (flash attention on: a quantized V cache needs it),
all fed the same tokens of a text in the same chunks; after each chunk, every context's
next-token distribution at every position is compared with the f16 context's: the KL
divergence KL(P_f16 || P_type) and whether the most likely token is the same. Asking for
``f16`` too compares a second f16 context with the reference, which must give 0.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

CHUNK = 128  # tokens decoded per step; every position's logits are kept for the comparison


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log of the softmax, computed stably in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def compare(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(P_reference || P_other) in nats, and whether the top tokens agree."""
    lp, lq = log_softmax(reference), log_softmax(other)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return np.maximum(kld, 0.0), reference.argmax(axis=1) == other.argmax(axis=1)


def summary(kld: np.ndarray, agree: np.ndarray) -> dict[str, float]:
    """Mean and 99th percentile of the KL divergence, and the share of positions whose top token agrees."""
    return {"kld_mean": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)),
            "top1_agreement": float(agree.mean()), "n_positions": int(kld.size)}


def tokenize(C, vocab, raw: bytes) -> list[int]:
    """Every token of ``raw`` (with BOS) by llama_tokenize, which returns the negative of the tokens it needs
    when the buffer is too small: then asked once more with a buffer of that size.

    Raises:
        SystemExit: the text overflows llama_tokenize's count, or it fails even with the size it asked for.
    """
    size = len(raw) + 16
    for _ in range(2):
        arr = (C.llama_token * size)()
        got = C.llama_tokenize(vocab, raw, len(raw), arr, size, True, False)
        if got >= 0:
            return list(arr[:got])
        if got == -2**31:  # INT32_MIN: more tokens than an int32 counts
            raise SystemExit("the text is too long for llama_tokenize")
        size = -got
    raise SystemExit(f"llama_tokenize failed on the text (it asked for {size} tokens twice)")


def _tokens(C, model, text: str, n: int) -> list[int]:
    tokens = tokenize(C, C.llama_model_get_vocab(model), text.encode())
    if len(tokens) < n:
        raise SystemExit(f"the text has {len(tokens)} tokens for this model; {n} are needed")
    return tokens[:n]


def _decode(C, ctx, tokens: list[int], start: int, n_vocab: int) -> np.ndarray:
    """Decode ``tokens`` at positions start.. with every position's logits; returns them (n x n_vocab)."""
    batch = C.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, True
        batch.n_tokens = len(tokens)
        if C.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return np.ctypeslib.as_array(C.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).copy()
    finally:
        C.llama_batch_free(batch)


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Measure every cache type of ``job`` against an f16 cache over the same tokens."""
    from llama_cpp import llama_cpp as C

    from llama_tuner.measure.child import load_model, new_context

    C.llama_backend_init()
    model, _ = load_model(job["model_path"], {"n_gpu_layers": job.get("n_gpu_layers", 0),
                                              "repack": job.get("repack", True)})
    if not model:
        raise SystemExit("llama.cpp could not load the model")
    n = job["n_tokens"]
    tokens = _tokens(C, model, job["text"], n)
    n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
    kinds = ["f16"] + list(job["cache_types"])  # the reference first
    contexts = []
    for kind in kinds:
        cfg = {"n_ctx": n, "n_batch": CHUNK, "n_ubatch": CHUNK, "n_threads": job["n_threads"],
               "n_threads_batch": job["n_threads"], "flash_attn": True, "type_k": kind, "type_v": kind,
               "offload_kqv": True, "swa_full": False}
        contexts.append(new_context(model, cfg))
    klds: dict[str, list[np.ndarray]] = {k: [] for k in job["cache_types"]}
    agrees: dict[str, list[np.ndarray]] = {k: [] for k in job["cache_types"]}
    for start in range(0, n, CHUNK):
        chunk = tokens[start:start + CHUNK]
        reference = _decode(C, contexts[0], chunk, start, n_vocab)
        for kind, ctx in zip(kinds[1:], contexts[1:]):
            kld, agree = compare(reference, _decode(C, ctx, chunk, start, n_vocab))
            klds[kind].append(kld)
            agrees[kind].append(agree)
    for ctx in contexts:
        C.llama_free(ctx)
    C.llama_model_free(model)
    return {kind: summary(np.concatenate(klds[kind]), np.concatenate(agrees[kind])) for kind in job["cache_types"]}


def main() -> None:
    """Read the job from stdin, print the result as JSON on stdout."""
    print(json.dumps(run(json.load(sys.stdin))))


if __name__ == "__main__":
    main()
