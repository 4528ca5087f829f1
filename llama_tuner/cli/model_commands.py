"""``llama-tuner inspect``, ``synth`` and ``demo``: what a GGUF file holds, twins, the demo model."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import click

from llama_tuner.errors import UserError
from llama_tuner.model.twins import SHAPE_FLAGS


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _tensor_groups(tensors) -> list[tuple[str, str]]:
    """Tensors grouped by role ("blk.*.attn_v.weight") with their types and layer counts."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in tensors:
        groups[re.sub(r"^blk\.\d+\.", "blk.*.", t.name)][t.type_name] += 1
    return [(name, ", ".join(f"{ty} x{n}" for ty, n in sorted(types.items(), key=lambda x: -x[1])))
            for name, types in groups.items()]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def models(as_json: bool) -> None:
    """List the GGUF files in Ollama's store, the Hugging Face cache, llama.cpp's cache and LM Studio's folders."""
    from llama_tuner.model.info import load_model_info
    from llama_tuner.model.stores import find_models

    rows = []
    for m in find_models():
        try:
            info = load_model_info(m.path)
            arch, quant, size = info.architecture, info.quant, info.file_size  # a split GGUF's: every shard's
        except UserError as exc:
            arch, quant, size = "unreadable", exc.problem, m.size
        rows.append({"source": m.source, "name": m.name, "size": size, "architecture": arch, "quant": quant,
                     "path": str(m.path)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no GGUF files in Ollama's store, the Hugging Face cache, llama.cpp's cache or LM Studio's folders")
        return
    from llama_tuner.report.tables import markdown_table

    click.echo(markdown_table([[r["source"], r["name"], _mib(r["size"]), r["architecture"], r["quant"]] for r in rows],
                              ("source", "name", "size", "architecture", "quant")))


@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--download", is_flag=True, help="Fetch an hf:ORG/REPO[:QUANT] model missing from the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--tensors", is_flag=True, help="List every tensor with its type, shape and size.")
@click.option("--plan", is_flag=True, help="Predict what fits a memory budget: layers, context, KV type.")
@click.option("--vram-budget", help="Budget for --plan, e.g. 12GiB (default: this GPU, else RAM).")
@click.option("--ctx", "ctx", type=int, default=4096, show_default=True, help="Context for --plan.")
def inspect(model: str, download: bool, as_json: bool, tensors: bool, plan: bool, vram_budget: str | None,
            ctx: int) -> None:
    """Describe MODEL (a path, ollama:NAME[:TAG] or hf:ORG/REPO[:QUANT]) from its GGUF header: shapes, quant
    types, bytes per part, KV cache per token."""
    from llama_tuner.model.info import load_model_info
    from llama_tuner.model.stores import resolve_model

    info = load_model_info(resolve_model(model, download=download))
    if plan:
        click.echo(_plan(info, vram_budget, ctx))
        return
    all_tensors = info.extra["tensors"]
    if as_json:
        d = info.to_dict()
        d["tensors"] = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.n_bytes}
                        for t in all_tensors]
        click.echo(json.dumps(d, indent=2))
        return
    lb = info.layer_bytes
    rows = [
        ("model", f"{info.file_name} ({_mib(info.file_size)}"
                  + (f" in {len(info.files)} files: a split GGUF)" if len(info.files) > 1 else ")")),
        ("name", info.name),
        ("architecture", f"{info.architecture}, {info.n_params / 1e6:,.2f} M params, {info.quant}"),
        ("layers", f"{info.n_layer}" + (f" ({len(info.swa_layers)} sliding-window, window {info.n_swa})"
                                         if info.swa_layers else "")),
        ("embedding", f"{info.n_embd}, FFN {info.n_ff}"),
        *([("experts", f"{info.n_expert} per layer, {info.n_expert_used} used per token"
                       + (f", {info.n_expert_shared} shared" if info.n_expert_shared else "")
                       + f"; expert tensors {_mib(sum(info.expert_bytes) / info.n_layer)} per layer, "
                         f"{_mib(sum(info.expert_bytes))} in all (--n-cpu-moe N keeps the first N layers' in RAM)")]
          if info.is_moe else []),
        ("heads", f"{max(info.n_head)} (KV heads {max(info.n_head_kv)}), head dim k/v {info.head_dim_k}/"
                  f"{info.head_dim_v}"),
        ("context", f"{info.n_ctx_train} (training)"),
        ("vocab", f"{info.n_vocab}"),
        ("bytes/layer", f"{_mib(sum(lb) / len(lb))} mean ({_mib(min(lb))}..{_mib(max(lb))}), "
                        f"all layers {_mib(sum(lb))}"),
        ("output", _mib(info.output_bytes) + (" (tied to the token embedding)" if info.tied_embeddings else "")),
        ("token embd", f"{_mib(info.token_embd_bytes)} (stays in RAM)"),
    ]
    for t in ("f16", "q8_0", "q4_0"):
        full, swa = info.kv_bytes_per_token(t, t, swa=False), info.kv_bytes_per_token(t, t, swa=True)
        split = f" (full-attention layers {full / 1024:,.2f} KiB, SWA layers {swa / 1024:,.2f} KiB)" if swa else ""
        rows.append((f"KV {t}", f"{(full + swa) / 1024:,.2f} KiB/token{split}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")
    click.echo("\ntensor types:")
    listing = ([(t.name, f"{t.type_name} {list(t.shape)} {_mib(t.n_bytes)}") for t in all_tensors] if tensors
               else _tensor_groups(all_tensors))
    width = max(len(n) for n, _ in listing)
    for name, desc in listing:
        click.echo(f"  {name.ljust(width)}  {desc}")


def _plan(info, vram_budget: str | None, ctx: int) -> str:
    from llama_tuner.report.memory_plan import plan_text
    from llama_tuner.measure.probe import detect_probe, ram_total
    from llama_tuner.units import parse_size

    if ctx < 1 or (info.n_ctx_train and ctx > info.n_ctx_train):
        raise UserError(f"--ctx {ctx} is outside 1..{info.n_ctx_train}", "give a context the model supports")
    gpus = detect_probe().gpus()
    if vram_budget is not None:
        return plan_text(info, parse_size(vram_budget, "--vram-budget"), ctx, on_gpu=True)
    if gpus:
        return plan_text(info, gpus[0].total_bytes, ctx, on_gpu=True)
    return plan_text(info, ram_total(), ctx, on_gpu=False)


def _shape_options(f):
    """One integer option per shape field, named as in SHAPE_FLAGS."""
    for field, flag in reversed(SHAPE_FLAGS.items()):
        f = click.option(flag, field, type=int, help=f"{field} of a custom shape (or to override --like).")(f)
    return f


@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--kv", "kinds", default="q8_0,q4_0", show_default=True, help="Cache types to compare with f16.")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="Text to read (default: the bundled public-domain text).")
@click.option("--tokens", "n_tokens", type=int, default=1024, show_default=True, help="Tokens of the text to read.")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, default=0, show_default=True)
@click.option("-t", "--threads", "n_threads", type=int, help="Threads (default: physical cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one object per cache type.")
@click.option("--download", is_flag=True, help="Fetch an hf:ORG/REPO[:QUANT] model missing from the cache.")
def quality(model: str, kinds: str, text_file: str | None, n_tokens: int, n_gpu_layers: int, n_threads: int | None,
            as_json: bool, download: bool) -> None:
    """How much each KV cache type changes MODEL's next-token distributions, against an f16 cache: mean and
    99th-percentile KL divergence and top-1 agreement over the same tokens. Cached per model and build."""
    from llama_tuner.measure.config import physical_cores
    from llama_tuner.measure.launcher import SubprocessLauncher
    from llama_tuner.measure.probe import NoGpuProbe
    from llama_tuner.measure.quality import CACHE_TYPES, kv_quality
    from llama_tuner.model.info import load_model_info
    from llama_tuner.model.stores import resolve_model
    from llama_tuner.report.tables import markdown_table

    model = resolve_model(model, download=download)
    load_model_info(model)  # a bad file is one line, before anything runs
    wanted = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in CACHE_TYPES]
    if unknown or not wanted:
        raise UserError(f"--kv {kinds!r} names no cache type llama-tuner compares", f"use {','.join(CACHE_TYPES)}")
    if n_tokens < 16:
        raise UserError(f"--tokens {n_tokens} is too few to say anything", "use --tokens 1024")
    text = open(text_file, encoding="utf-8").read() if text_file else None
    repack = SubprocessLauncher(NoGpuProbe()).repack_crash() is None
    click.echo(f"comparing {', '.join(wanted)} KV caches with f16 over {n_tokens} tokens "
               "(flash attention on)...", err=True)
    figures = kv_quality(model, wanted, text=text, n_tokens=n_tokens, n_threads=n_threads or physical_cores(),
                         n_gpu_layers=n_gpu_layers, repack=repack)
    if as_json:
        click.echo(json.dumps([{"type": k, **v} for k, v in figures.items()], indent=2))
        return
    click.echo(markdown_table([[k, f"{v['kld_mean']:.4f}", f"{v['kld_p99']:.4f}", f"{100 * v['top1_agreement']:.1f}%",
                                str(v["n_positions"])] for k, v in figures.items()],
                              ("KV cache", "KLD mean", "KLD p99", "top-1 agreement", "positions")))


@click.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--like", help="A named shape: tiny, small, qwen3-8b, mistral-small-24b, qwen3-30b-a3b, tiny-moe.")
@click.option("--quant", required=True, help="f16, q8_0, q4_0, q6_k, q5_k_m, q4_k_m or q2_k.")
@click.option("--arch", type=click.Choice(["llama", "qwen3", "qwen3moe"]), help="Architecture of a custom shape.")
@_shape_options
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: str, like: str | None, quant: str, seed: int, **shape) -> None:
    """Write a random-weight GGUF with real shapes and quant types to OUT."""
    from llama_tuner.model.twins import plan_tensors, resolve_shape, write_synthetic_gguf

    s = resolve_shape(like, **shape)
    total = sum(t.n_bytes for t in plan_tensors(s, quant.lower()))
    click.echo(f"writing {out}: {s.arch}, {s.n_layer} layers, embd {s.n_embd}, {quant}, {_mib(total)}", err=True)
    write_synthetic_gguf(out, s, quant.lower(), seed=seed)
    click.echo(out)


@click.command()
@click.option("--dir", "directory", default="models", show_default=True, help="Where to write the model.")
def demo(directory: str) -> None:
    """Write the bundled demo model (Gemma 3 270M Q4_K_M) and print its path."""
    from llama_tuner.model.demo import demo_model

    click.echo(str(demo_model(directory)))
