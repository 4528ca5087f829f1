"""How a child's ending is classified, from canned llama.cpp logs (no child is started)."""

from __future__ import annotations

import signal

import pytest

from llama_tuner.measure.launcher import classify_death, evidence_line
from llama_tuner.measure.result import Status

CUDA_OOM = """llama_model_load_from_file_impl: using device CUDA0 (NVIDIA GeForce RTX 4070) - 11102 MiB free
load_tensors: offloading 41 repeating layers to GPU
ggml_backend_cuda_buffer_type_alloc_buffer: allocating 11520.00 MiB on device 0: cudaMalloc failed: out of memory
alloc_tensor_range: failed to allocate CUDA0 buffer of size 12079595520
llama_model_load: error loading model: unable to allocate CUDA0 buffer
"""
ASSERT = """llama_context: n_ctx = 4096
/tmp/llama-cpp-python/vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp:5123: GGML_ASSERT(ne00 == ne01) failed
"""
UNKNOWN_ARCH = """llama_model_loader: - kv   0: general.architecture str = nosucharch
llama_model_load: error loading model: error loading model architecture: unknown model architecture: 'nosucharch'
llama_model_load_from_file_impl: failed to load model
"""
TRACEBACK = """Traceback (most recent call last):
  File "/work/tuner/measure/child.py", line 300, in main
    run_job(json.load(sys.stdin), Events(args.events_fd))
json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)
"""


@pytest.mark.parametrize("code,timed_out,tail,status,needles", [
    (1, False, CUDA_OOM, Status.OOM, ["out of memory", "cudaMalloc failed"]),
    (-signal.SIGABRT, False, ASSERT, Status.CRASH, ["SIGABRT", "GGML_ASSERT(ne00 == ne01) failed"]),
    (-signal.SIGSEGV, False, "", Status.CRASH, ["child died of SIGSEGV"]),
    (-signal.SIGKILL, False, "llama_context: n_ctx = 131072\n", Status.OOM, ["SIGKILL", "OOM killer"]),
    (-signal.SIGILL, False, "", Status.CRASH, ["SIGILL", "ggml-org/llama.cpp#26954", "--repack 0"]),
    (1, False, UNKNOWN_ARCH, Status.CRASH, ["code 1", "unknown model architecture: 'nosucharch'"]),
    (1, False, TRACEBACK, Status.CRASH, ["code 1", "JSONDecodeError: Expecting value"]),
    (3, False, "", Status.CRASH, ["exited with code 3 without a result"]),
    (-signal.SIGKILL, True, CUDA_OOM, Status.TIMEOUT, ["no result within 60 s", "killed"]),
])
def test_a_child_that_ended_without_its_result_is_classified_with_its_cause(code, timed_out, tail, status, needles):
    got, reason = classify_death(code, timed_out, 60, tail)
    assert got == status, reason
    for needle in needles:
        assert needle in reason, (needle, reason)


def test_the_decisive_line_is_the_cause_not_its_consequences():
    assert evidence_line(UNKNOWN_ARCH).endswith("unknown model architecture: 'nosucharch'")
    assert "cudaMalloc failed: out of memory" in evidence_line(CUDA_OOM)  # not "unable to allocate" after it
    assert evidence_line(TRACEBACK).startswith("json.decoder.JSONDecodeError")
    assert evidence_line("") == "" and evidence_line("just a line\n") == "just a line"
    assert len(evidence_line("error: " + "x" * 500)) == 200
