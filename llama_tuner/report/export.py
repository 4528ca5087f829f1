"""A preset as something to run: llama-server flags, llama-cpp-python kwargs, an Ollama Modelfile, JSON."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from llama_tuner.measure.config import SERVER_DEFAULTS, BenchConfig
from llama_tuner.measure.llama_server import LlamaServer
from llama_tuner.measure.server_args import (LLAMA_SERVER_CACHE_RAM_MIB, llama_server_args,  # noqa: F401
                                             respell)
from llama_tuner.study.comparison import Gap
from llama_tuner.study.presets import Candidate, gain
from llama_tuner.study.quality_gate import cache_kld, kld_text
from llama_tuner.study.view import StudyView
from llama_tuner.units import format_size

FORMATS = ("llama-server", "llama-cpp-python", "ollama", "json")  # one study's preset
MULTI_FORMATS = ("llama-swap",)  # one entry per study
_GGML_TYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
                    "q5_0": "Q5_0", "q5_1": "Q5_1", "iq4_nl": "IQ4_NL"}


def host_cache_mib(view: StudyView, candidate: Candidate) -> int | None:
    """The ``--cache-ram`` a preset needs where the study's budget is RAM: what the budget leaves above the
    preset's peak and the headroom, where that is less than llama-server's 8 GiB default (None: the default
    fits, or the budget is a GPU's)."""
    f = candidate.figures
    if view.environment.uses_gpu or not f.peak_memory_bytes:
        return None
    limits = view.limits
    left = (limits.budget_bytes - limits.min_headroom_bytes - f.peak_memory_bytes) // 2**20
    return max(0, int(left)) if left < LLAMA_SERVER_CACHE_RAM_MIB else None


def llama_server_command(model_path: str, c: BenchConfig, *, server: LlamaServer | None = None,
                         cache_ram_mib: int | None = None) -> str:
    """A llama-server command line for ``c``, quoted for the shell (see :func:`llama_server_args`: ``server``
    runs it and spells it).

    Raises:
        UserError: ``server`` lacks a flag the preset needs.
    """
    if server is None:
        return shlex.join(llama_server_args(model_path, c, cache_ram_mib=cache_ram_mib))
    return shlex.join(llama_server_args(model_path, c, program=server.path, server=server,
                                        cache_ram_mib=cache_ram_mib))


def llama_swap_config(views: list[StudyView], preset: str, *, server: LlamaServer | None = None) -> str:
    """A llama-swap configuration (YAML) with one model per study, started with its ``preset``: several
    tuned models behind one OpenAI-compatible endpoint. The model's name is its file's stem (the study's
    name where two studies share a file name); llama-swap fills in ``${PORT}``. Given ``server``, the commands
    run it and are spelled as it accepts them.

    Raises:
        UserError: a study has no feasible configuration, so no preset; ``server`` lacks a flag a preset needs.
    """
    stems = [Path(v.model_file).stem for v in views]
    models = {}
    for view, stem in zip(views, stems):
        cand = view.preset(preset).candidate
        f = cand.figures
        args = llama_server_args(view.model_path, f.config, **({} if server is None else
                                                                {"program": server.path, "server": server}))
        if server is not None:
            server.require("--port")
        models[stem if stems.count(stem) == 1 else view.name] = {
            "name": f"{stem} ({preset})",
            "description": (f"llama-tuner study {view.name}, trial {cand.trial}: tg {f.tg_mean:.2f} t/s, "
                            f"pp {f.pp_mean:.2f} t/s, peak {format_size(f.peak_memory_bytes)}"),
            "cmd": f"{args[0]} --port ${{PORT}} {shlex.join(args[1:])}",
        }
    header = "# llama-swap configuration written by llama-tuner: one tuned preset per model\n"
    return header + yaml.safe_dump({"models": models}, sort_keys=False, width=10_000)


def llama_cpp_python_kwargs(model_path: str, c: BenchConfig) -> dict[str, Any]:
    """Keyword arguments of ``llama_cpp.Llama`` (cache types as ggml type names)."""
    return {"model_path": model_path, "n_gpu_layers": c.n_gpu_layers, "n_ctx": c.n_ctx, "n_batch": c.n_batch,
            "n_ubatch": c.n_ubatch, "n_threads": c.n_threads, "n_threads_batch": c.n_threads_batch,
            "flash_attn": c.flash_attn, "type_k": f"GGML_TYPE_{_GGML_TYPE_NAMES[c.type_k]}",
            "type_v": f"GGML_TYPE_{_GGML_TYPE_NAMES[c.type_v]}", "use_mmap": c.use_mmap,
            "offload_kqv": c.offload_kqv, "swa_full": c.swa_full}


def llama_cpp_python_snippet(model_path: str, c: BenchConfig, header: str = "") -> str:
    """Python code that builds the preset's ``Llama`` (llama-cpp-python ignores unknown kwargs, so every
    name here is one it reads), after ``header`` as comment lines."""
    kw = llama_cpp_python_kwargs(model_path, c)
    lines = [f"# {line}" for line in header.splitlines()] + ["import llama_cpp", "from llama_cpp import Llama", ""]
    if not c.repack:
        lines += ["# measured with weight repacking off (llama-server --no-repack); Llama(...) has no setting "
                  "for it", ""]
    if c.n_cpu_moe:
        lines += [f"# measured with the expert tensors of the first {c.n_cpu_moe} layers in host memory "
                  f"(llama-server --n-cpu-moe {c.n_cpu_moe}); Llama(...) has no keyword for it (its "
                  "tensor_buft_overrides field is never filled): use llama-server, or load through llama.cpp's API",
                  ""]
    if c.n_parallel > 1:
        lines += [f"# measured as {c.n_parallel} streams decoding together (llama-server --parallel "
                  f"{c.n_parallel}); one Llama serves one stream at a time", ""]
    if c.speculative:
        lines += [f"# measured with llama-server's speculative decoding (--spec-type {c.spec_type}), which Llama "
                  "does not have: generation will be slower than measured", ""]
    lines.append("llm = Llama(")
    for k, v in kw.items():
        value = f"llama_cpp.{v}" if k in ("type_k", "type_v") else repr(v)
        lines.append(f"    {k}={value},")
    return "\n".join(lines + [")", ""])


def ollama_modelfile(model_path: str, c: BenchConfig, header: str = "") -> str:
    """An Ollama Modelfile. Ollama passes ``num_batch`` to llama.cpp as the physical batch (n_ubatch)
    and uses ``num_thread`` for prompts too; flash attention and the KV cache type are server settings."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    source = json.dumps(model_path) if any(ch.isspace() for ch in model_path) else model_path
    # Ollama gives each of its OLLAMA_NUM_PARALLEL requests a num_ctx of its own.
    lines += [f"FROM {source}", f"PARAMETER num_ctx {c.n_ctx // c.n_parallel}", f"PARAMETER num_batch {c.n_ubatch}",
              f"PARAMETER num_gpu {c.n_gpu_layers}", f"PARAMETER num_thread {c.n_threads}"]
    if c.n_threads_batch != c.n_threads:
        lines.append(f"# measured with {c.n_threads_batch} prompt threads; Ollama uses num_thread for both")
    if not c.repack:
        lines.append("# measured with weight repacking off (llama-server --no-repack); Ollama has no setting for it")
    if c.n_cpu_moe:
        lines.append(f"# measured with the expert tensors of the first {c.n_cpu_moe} layers in host memory "
                     f"(llama-server --n-cpu-moe {c.n_cpu_moe}); Ollama has no expert placement: it offloads "
                     "whole layers only")
    if c.speculative:
        lines.append(f"# measured with llama-server's speculative decoding (--spec-type {c.spec_type}); Ollama has "
                     "none: its generation will be slower than measured")
    server = [f"OLLAMA_FLASH_ATTENTION={int(c.flash_attn)}"]
    if c.n_parallel > 1:
        server.append(f"OLLAMA_NUM_PARALLEL={c.n_parallel}")

    if c.type_k == c.type_v:
        server.append(f"OLLAMA_KV_CACHE_TYPE={c.type_k}")
    else:
        lines.append(f"# Ollama has one KV cache type; measured with K {c.type_k}, V {c.type_v}")
    lines += ["# flash attention and the KV cache type are set where the server starts:",
              f"#   {' '.join(server)} ollama serve"]
    return "\n".join(lines) + "\n"


def preset_json(name: str, candidate: Candidate, model_path: str, study: str, env: dict[str, Any],
                gains: dict[str, dict[str, Any]] | None = None, *, server: LlamaServer | None = None,
                cache_ram_mib: int | None = None) -> dict[str, Any]:
    """The preset with its measured figures, as a JSON-ready dict (its llama-server command for ``server``).

    Raises:
        UserError: ``server`` lacks a flag the preset needs.
    """
    f = candidate.figures
    c = f.config
    return {
        "preset": name, "study": study, "trial": candidate.trial, "baseline": candidate.baseline,
        "model_path": model_path,
        # llama-server's own settings only where set: a preset without speculation reads as it always did
        "settings": {k: v for k, v in c.to_dict().items()
                     if k != "seed" and (k not in SERVER_DEFAULTS or v != SERVER_DEFAULTS[k])},
        "measured": {"tg_tps": f.tg_mean, "tg_stddev": f.tg.stddev if f.tg else None,
                     **({"draft_acceptance": f.acceptance, "drafted": f.draft_n} if c.speculative else {}),
                     "pp_tps": f.pp_mean, "pp_stddev": f.pp.stddev if f.pp else None,
                     "repetitions": c.repetitions, "n_prompt": c.n_prompt, "n_gen": c.n_gen, "n_depth": c.n_depth,
                     "peak_memory_bytes": f.peak_memory_bytes, "headroom_bytes": f.headroom_bytes,
                     **workload_figures(f)},
        "gain_over_baselines": gains or {},
        "environment": env,
        "llama_server": llama_server_command(model_path, c, server=server, cache_ram_mib=cache_ram_mib),
        "llama_cpp_python": llama_cpp_python_kwargs(model_path, c),
    }


def workload_figures(f) -> dict[str, Any]:
    """What the workload is judged by: seconds to answer and the depth curve, or aggregate and per-stream tg."""
    c = f.config
    out: dict[str, Any] = {"workload": c.workload}
    if f.time_to_answer_s is not None:
        out["time_to_answer_s"] = f.time_to_answer_s
        out["depth_curve"] = f.curve.points()
    if c.workload == "server":
        out.update(n_parallel=c.n_parallel, tg_aggregate_tps=f.tg_mean, tg_per_stream_tps=f.stream_tg_mean)
    return out


def gap_json(g: Gap) -> dict[str, Any]:
    """A gain as JSON: the share, its 95% half-width (None when unknown), the verdict and how it was paired."""
    return {"share": g.share, "half_width": None if g.half == float("inf") else g.half, "verdict": g.verdict,
            "paired_rounds": g.rounds if g.paired else 0}


def gains_over_baselines(view: StudyView, candidate: Candidate) -> dict[str, dict[str, Any]]:
    """The candidate's tg and pp gain over each baseline that ran (another baseline than itself), with its
    interval and verdict (a gain inside the interval is a tie)."""
    return {name: {fig: gap_json(gain(candidate, b, fig)) for fig in ("tg", "pp")}
            for name, b in view.baselines.items() if b.figures.ok and b.trial != candidate.trial}


def preset_header(view: StudyView, name: str) -> str:
    """Comment lines for an exported preset: where it comes from, its figures and why it was chosen."""
    p = view.preset(name)
    f = p.candidate.figures
    return (f"llama-tuner preset {name!r} from study {view.name!r} ({p.candidate.label})\n"
            f"measured: tg {f.tg_mean:.2f} t/s, pp {f.pp_mean:.2f} t/s, peak {format_size(f.peak_memory_bytes)}\n"
            f"why: {p.why}")


def exported_environment(view: StudyView) -> dict[str, Any]:
    """Where the study measured, as exports show it (without llama.cpp's long system-info line)."""
    return {k: v for k, v in asdict(view.environment).items() if k != "system_info"}


def study_preset_json(view: StudyView, name: str, *, server: LlamaServer | None = None) -> dict[str, Any]:
    """Preset ``name`` of the study as JSON, with its gains and the reason it was chosen (its llama-server
    command for ``server``).

    Raises:
        UserError: ``server`` lacks a flag the preset needs.
    """
    p = view.presets[name]
    cfg = p.candidate.figures.config
    return {**preset_json(name, p.candidate, view.model_path, view.name, exported_environment(view),
                          gains_over_baselines(view, p.candidate), server=server,
                          cache_ram_mib=host_cache_mib(view, p.candidate)), "why": p.why,
            "kv_cache_kld": cache_kld(cfg, view.kv_quality), "kv_cache_quality": kld_text(cfg, view.kv_quality)}


def render_study_preset(view: StudyView, fmt: str, name: str, *, server: LlamaServer | None = None) -> str:
    """Preset ``name`` of the study in format ``fmt`` (its llama-server command for ``server``).

    Raises:
        UserError: the study has no feasible configuration, so no preset; ``server`` lacks a flag it needs.
    """
    cand = view.preset(name).candidate
    if fmt == "json":  # with the reason it won and its KV cache's quality
        return json.dumps(study_preset_json(view, name, server=server), indent=2) + "\n"
    return render(fmt, name, cand, view.model_path, view.name, exported_environment(view),
                  gains_over_baselines(view, cand), header=preset_header(view, name), server=server,
                  cache_ram_mib=host_cache_mib(view, cand))


def render(fmt: str, name: str, candidate: Candidate, model_path: str, study: str, env: dict[str, Any],
           gains: dict[str, dict[str, Any]] | None = None, *, header: str = "",
           server: LlamaServer | None = None, cache_ram_mib: int | None = None) -> str:
    """The preset in format ``fmt`` (one of FORMATS); ``header`` becomes comment lines where the format has
    comments (the llama-server command line has none: it is meant for the shell as it is); the llama-server
    command runs ``server`` and is spelled as it accepts it, where given.

    Raises:
        UserError: ``server`` lacks a flag the preset needs.
    """
    c = candidate.figures.config
    if fmt == "llama-server":
        return llama_server_command(model_path, c, server=server, cache_ram_mib=cache_ram_mib) + "\n"
    if fmt == "llama-cpp-python":
        return llama_cpp_python_snippet(model_path, c, header)
    if fmt == "ollama":
        if not header:
            f = candidate.figures
            header = (f"llama-tuner preset {name!r} from study {study!r} (trial {candidate.trial})\n"
                      f"measured: tg {f.tg_mean:.2f} t/s, pp {f.pp_mean:.2f} t/s, "
                      f"peak {format_size(f.peak_memory_bytes)}")
        return ollama_modelfile(model_path, c, header)
    return json.dumps(preset_json(name, candidate, model_path, study, env, gains, server=server,
                                  cache_ram_mib=cache_ram_mib), indent=2) + "\n"
