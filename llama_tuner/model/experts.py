"""Which tensors of a mixture of experts are its routed experts: llama.cpp's own pattern, in one place.

llama-server's ``--n-cpu-moe N`` keeps the tensors matching ``blk\\.i`` + LLM_FFN_EXPS_REGEX (common/common.h)
in host memory for each layer i < N; the header's account of them (:mod:`llama_tuner.model.info`) and the measuring
child's overrides (:mod:`llama_tuner.measure.child`) both use this. It imports nothing heavy: the child loads it.
"""

from __future__ import annotations

import re

FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's LLM_FFN_EXPS_REGEX
_EXPERT_TENSOR = re.compile(r"^blk\.\d+" + FFN_EXPS_REGEX)


def layer_experts_pattern(il: int) -> str:
    """The regex of layer ``il``'s expert tensors, as llama.cpp's ``llm_ffn_exps_block_regex(il)`` writes it."""
    return rf"blk\.{il}{FFN_EXPS_REGEX}"


def is_expert_tensor(name: str) -> bool:
    """True for a routed expert's tensor, which ``--n-cpu-moe`` and ``--cpu-moe`` place in host memory."""
    return _EXPERT_TENSOR.match(name) is not None
