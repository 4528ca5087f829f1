"""Workloads: what a user does with the model, each with its measurement and the figure it is judged by.

- ``pp-tg`` (default): llama-bench's tests, pp ``n_prompt`` and tg ``n_gen`` apart, at ``n_depth``.
- ``chat``, ``reasoning``, ``long``, ``custom``: a prompt of ``n_prompt`` tokens after ``n_depth``
  tokens already in the context, then ``n_gen`` generated tokens; judged by the seconds to the
  end of the answer. They are measured as a *depth curve* of one loaded context: the
  context is filled, in ``n_batch`` chunks, up to each depth of :func:`curve_depths`, the
  time of each span kept, and at each depth ``PROBE_TOKENS`` tokens are generated as a reply is
  (each sampled, greedy, from the last one's logits and fed back), timed, and removed again.
  The prompt's time is the sum of its spans; the answer's is the per-token time, interpolated
  linearly in depth between the probes (attention grows linearly with it), summed over the
  generated tokens' depths.
- ``scenarios``: the user's own requests (a JSONL file, :mod:`llama_tuner.measure.scenarios`), each answered for
  real in llama-server until the end of turn or its cap: judged by the seconds per answer (the median over the
  file), with tokens written, thinking apart, and capped answers beside it. ``n_prompt`` and ``n_gen`` are the
  longest request's estimated prompt and the largest cap: what the context must hold.
- ``server``: ``n_parallel`` streams, each a prompt of ``n_prompt`` tokens, then ``n_gen`` tokens
  decoded together, one batch per step, as llama-server's slots and llama-batched-bench do:
  judged by the aggregate generation rate with every stream above ``--min-stream-tps``.
"""

from __future__ import annotations

from dataclasses import dataclass

WORKLOADS = ("pp-tg", "chat", "reasoning", "long", "server", "custom", "scenarios")
SCENARIOS = "scenarios"  # real requests in words, answered by llama-server (never the child)
CURVE_WORKLOADS = ("chat", "reasoning", "long", "custom")
PROBE_TOKENS = 16
CURVE_STEP = 1024  # probes at 0, 1k, 2k, 4k, 8k ... (doubling), and at the prompt's start and end and the answer's end


@dataclass(frozen=True)
class Workload:
    """A named workload's test sizes and what it is judged by."""

    name: str
    n_prompt: int
    n_gen: int
    description: str
    n_depth: int = 0


PRESETS = {
    "pp-tg": Workload("pp-tg", 512, 128, "llama-bench's pp512 and tg128, measured apart"),
    "chat": Workload("chat", 1024, 256, "a 1,024-token prompt, then a 256-token reply: seconds per reply"),
    "reasoning": Workload("reasoning", 512, 4096, "a 512-token prompt, then 4,096 generated (thinking) tokens: "
                          "seconds to the answer"),
    "long": Workload("long", 16384, 256, "a 16,384-token document, then 256 tokens: seconds, prefill-bound"),
    "server": Workload("server", 512, 128, "N streams decoding together: aggregate t/s, each stream above "
                       "--min-stream-tps"),
    "custom": Workload("custom", 512, 128, "--prompt-tokens after --depth, then --gen-tokens: seconds"),
    "scenarios": Workload("scenarios", 512, 4096, "your requests (--prompts FILE), answered for real in "
                          "llama-server: seconds per answer"),
}


def judged_by_answer(workload: str) -> bool:
    """True for the workloads judged by seconds per answer (the curves, and the scenarios)."""
    return is_curve(workload) or workload == SCENARIOS


def is_curve(workload: str) -> bool:
    """True for the workloads measured as a depth curve (judged by seconds to answer)."""
    return workload in CURVE_WORKLOADS


def curve_depths(n_depth: int, n_prompt: int, n_gen: int) -> list[int]:
    """The depths the curve probes: 0, the prompt's start and end, the answer's end, and CURVE_STEP doubling."""
    end = n_depth + n_prompt + n_gen
    points = {0, n_depth, n_depth + n_prompt, end}
    d = CURVE_STEP
    while d < end:
        points.add(d)
        d *= 2
    return sorted(points)


def _per_token_s(depths: list[int], probe_ns: list[int], probe_tokens: int):
    """Seconds per generated token at any depth: linear between probes, flat beyond the last."""
    secs = [ns / 1e9 / probe_tokens for ns in probe_ns]

    def at(d: float) -> float:
        if d <= depths[0]:
            return secs[0]
        for i in range(1, len(depths)):
            if d <= depths[i]:
                w = (d - depths[i - 1]) / (depths[i] - depths[i - 1])
                return secs[i - 1] + w * (secs[i] - secs[i - 1])
        return secs[-1]
    return at


def answer_ns(depths: list[int], span_ns: list[int], probe_ns: list[int], probe_tokens: int,
              n_depth: int, n_prompt: int, n_gen: int) -> tuple[int, int]:
    """(prompt ns, generation ns) of one curve: the prompt's spans summed, and the generated tokens'
    per-token times (depths ``n_depth + n_prompt`` onwards) integrated over the curve.

    ``span_ns[i]`` is the time to fill the context from ``depths[i]`` to ``depths[i + 1]``.
    """
    start, end = n_depth, n_depth + n_prompt
    prompt = 0.0
    for i, ns in enumerate(span_ns):
        lo, hi = depths[i], depths[i + 1]
        overlap = max(0, min(hi, end) - max(lo, start))
        prompt += ns * overlap / (hi - lo)
    at = _per_token_s(depths, probe_ns, probe_tokens)
    # Trapezoid over the generated tokens' depths, exact for a per-token time linear between probes.
    step = max(1, n_gen // 256)
    gen = sum(at(end + i + step / 2) * min(step, n_gen - i) for i in range(0, n_gen, step))
    return int(prompt), int(gen * 1e9)
