"""How much of a tg measurement is Python, not llama.cpp? Noise-free: both clocks run in the same process.

llama-tuner's child times tg from Python (ctypes calls around each llama_decode);
llama.cpp's own perf counters time only the decodes. The difference per token is
the cost our measuring loop adds over llama-bench's C++ loop.

Usage: python bench/python_overhead.py [MODEL]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_cpp import llama_cpp as C  # noqa: E402

from llama_tuner.measure import child  # noqa: E402
from llama_tuner.measure.timer import Timer  # noqa: E402

MODEL = sys.argv[1] if len(sys.argv) > 1 else "models/gemma-3-270m-Q4_K_M.gguf"
C.llama_log_set(child._LOG_CALLBACK, None)
C.llama_backend_init()
model, _ = child.load_model(MODEL, {"n_gpu_layers": 0, "use_mmap": True})
cfg = {"n_ctx": 256, "n_batch": 128, "n_ubatch": 128, "n_threads": 1, "n_threads_batch": 1, "flash_attn": False,
       "type_k": "f16", "type_v": "f16", "offload_kqv": True, "swa_full": False, "n_prompt": 0, "n_gen": 128,
       "n_depth": 0, "repetitions": 1, "seed": 1}
cp = C.llama_context_default_params()
for k in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch"):
    setattr(cp, k, cfg[k])
cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
cp.no_perf = False
ctx = C.llama_init_from_model(model, cp)
t = Timer(ctx, model, cfg)
C.llama_memory_clear(t.memory, False)
t.generate(1)
for rep in range(5):
    C.llama_memory_clear(t.memory, False)
    C.llama_perf_context_reset(ctx)
    wall = t.generate(128) / 1e9
    perf = C.llama_perf_context(ctx)
    print(f"rep {rep}: wall {wall*1000:.1f} ms, llama.cpp eval {perf.t_eval_ms:.1f} ms over {perf.n_eval} tokens, "
          f"outside llama.cpp {(wall*1000 - perf.t_eval_ms)/128*1000:.1f} us/token "
          f"({100*(wall*1000-perf.t_eval_ms)/(wall*1000):.2f}%)")
