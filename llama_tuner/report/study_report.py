"""Text reports of a study: its trials, its presets, and their gains over the baselines."""

from __future__ import annotations

from llama_tuner.measure.workloads import SCENARIOS, is_curve
from llama_tuner.report.answer_agreement import agreement_table
from llama_tuner.report.export import host_cache_mib, llama_server_command
from llama_tuner.study.presets import gain
from llama_tuner.study.quality_gate import excluded_note, kld_text
from llama_tuner.study.keys import BASELINE_ATTR, REUSED_ATTR
from llama_tuner.study.objectives import result_of
from llama_tuner.study.view import StudyView
from llama_tuner.report.tables import markdown_table
from llama_tuner.units import format_size

TRIAL_COLUMNS = ("#", "status", "ngl", "n_ctx", "batch", "ubatch", "threads", "fa", "K/V", "repack", "tg t/s",
                 "pp t/s", "GB/s", "peak mem", "predicted", "headroom", "feasible", "note")
PRESET_COLUMNS = ("preset", "trial", "ngl", "n_ctx", "batch", "ubatch", "threads", "fa", "K/V", "repack",
                  "tg t/s", "pp t/s", "peak mem", "headroom", "KV KLD")


def _rate(rates) -> str:
    return f"{rates.mean:.2f} ± {rates.stddev:.2f}" if rates and rates.samples_ns else "-"


def _tg(r) -> str:
    """tg as _rate writes it, with the speculative type and its acceptance where it drafted:
    ``88.10 ± 1.20 (ngram-mod, 91% accepted)``."""
    text = _rate(r.tg)
    if r.config.speculative and text != "-":
        text += f" ({r.config.spec_type}, " + (f"{100 * r.acceptance:.0f}% accepted)" if r.draft_n
                                               else "nothing drafted)")
    return text


def _settings(c) -> list[str]:
    threads = str(c.n_threads) if c.n_threads == c.n_threads_batch else f"{c.n_threads}/{c.n_threads_batch}"
    ngl = f"{c.n_gpu_layers} (-ncmoe {c.n_cpu_moe})" if c.n_cpu_moe else str(c.n_gpu_layers)
    return [ngl, str(c.n_ctx), str(c.n_batch), str(c.n_ubatch), threads, str(int(c.flash_attn)),
            f"{c.type_k}/{c.type_v}", str(int(c.repack))]


def header(view: StudyView) -> str:
    """Two lines: what was tuned where, and under which limits."""
    env, lim = view.environment, view.limits
    where = env.gpu_name or f"{env.cpu}, {env.physical_cores} cores"
    measured = sum(1 for t in view.trials if REUSED_ATTR not in t.user_attrs)
    engine = (f"measured in llama-server {env.llama_server} over HTTP" if env.engine == "llama-server"
              else f"llama-cpp-python {env.llama_cpp_python}, {env.llama_cpp_build}")
    return (f"study {view.name}: {view.attrs.get('model_file')} on {where}; {engine}\n"
            f"workload {view.workload}, objective {view.objective}; budget {format_size(lim.budget_bytes)}, "
            f"min headroom {format_size(lim.min_headroom_bytes)}, min ctx {lim.min_ctx}"
            + (f", min {lim.min_stream_tps:g} t/s per stream" if lim.min_stream_tps else "")
            + f"; {measured} configurations measured")


def trials_table(view: StudyView) -> str:
    """One row per completed trial."""
    rows = []
    for t in view.trials:
        r = result_of(t)
        notes = [f"baseline: {t.user_attrs[BASELINE_ATTR]}"] if BASELINE_ATTR in t.user_attrs else []
        if REUSED_ATTR in t.user_attrs:
            notes.append(f"same as #{t.user_attrs[REUSED_ATTR]}")
        if not r.ok:
            notes.append(r.reason[:70])
        feasible = all(v <= 0 for v in t.constraints.values())
        bw = r.bandwidth or {}
        gbs = f"{bw['achieved_gbs']:.1f}" if "achieved_gbs" in bw else "-"
        if "bandwidth_share" in bw:
            gbs += f" ({100 * bw['bandwidth_share']:.0f}%)"
        rows.append([str(t.number), r.status.value, *_settings(r.config), _tg(r), _rate(r.pp), gbs,
                     format_size(r.peak_memory_bytes), format_size(r.predicted_peak_bytes),
                     format_size(r.headroom_bytes), "yes" if feasible else "no", "; ".join(notes)])
    return markdown_table(rows, TRIAL_COLUMNS)


def _workload_columns(workload: str) -> list[str]:
    if workload == SCENARIOS:
        return ["s/answer", "p90 s", "written", "capped"]
    if is_curve(workload):
        return ["answer s"]
    return ["streams", "tg/stream"] if workload == "server" else []


def _workload_cells(f, workload: str) -> list[str]:
    """The figures the workload is judged by: seconds to answer (the scenarios: median and p90 over the file,
    tokens written per answer with thinking apart, capped answers), or streams and each one's tg."""
    if workload == SCENARIOS:
        s = f.answer_summary if f.ok else None
        if s is None:
            return ["-"] * 4
        thinking = f" ({s.thinking_tokens:,.0f} thinking)" if s.thinking_tokens else ""
        return [f"{s.median_s:.2f}", f"{s.p90_s:.2f}", f"{s.generated_tokens:,.0f}{thinking}",
                f"{s.capped}/{s.requests}"]
    if is_curve(workload):
        return [f"{f.time_to_answer_s:.2f}" if f.ok and f.time_to_answer_s is not None else "-"]
    if workload == "server":
        return [str(f.config.n_parallel), f"{f.stream_tg_mean:.2f}" if f.ok and f.tg else "-"]
    return []


def preset_rows(view: StudyView) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the presets table, with the gain over each baseline in % and its 95% interval
    ("tie" inside it); a baseline that may not be a preset says why."""
    bases = {n: c for n, c in view.baselines.items() if c.figures.ok}
    w, obj = view.workload, view.objective
    gains = ["tg", "pp"] if obj in ("tg", "pp", "balanced") else [obj]
    columns = (list(PRESET_COLUMNS) + _workload_columns(w)
               + [f"{g} vs {n}" for g in gains for n in bases])
    rows = []
    for name, p in view.presets.items():
        f = p.candidate.figures
        rows.append([name, str(p.candidate.trial), *_settings(f.config), _tg(f), _rate(f.pp),
                     format_size(f.peak_memory_bytes), format_size(f.headroom_bytes),
                     kld_text(f.config, view.kv_quality), *_workload_cells(f, w)]
                    + ["itself" if b is p.candidate or b.trial == p.candidate.trial
                       else gain(p.candidate, b, g).text() for g in gains for b in bases.values()])
    for name, b in view.baselines.items():
        f = b.figures
        why_not = view.why_not_kept(b)
        label = f"(baseline) {name}" + (f" [reference: {why_not}]" if why_not else "")
        rows.append([label, str(b.trial), *_settings(f.config), _tg(f) if f.ok else f.status.value,
                     _rate(f.pp) if f.ok else "-", format_size(f.peak_memory_bytes), format_size(f.headroom_bytes),
                     kld_text(f.config, view.kv_quality), *_workload_cells(f, w)]
                    + [""] * (len(gains) * len(bases)))
    return columns, rows


def depth_curve_table(view: StudyView) -> str:
    """Every measured trial's depth curve: tg at each probed depth, and pp of each span filled up to it;
    presets and baselines named ("" when the workload measures no curve)."""
    names = {p.candidate.trial: name for name, p in view.presets.items()}
    names.update({b.trial: f"baseline: {n}" for n, b in view.baselines.items()})
    curves = [(t.number, f) for t in view.trials if REUSED_ATTR not in t.user_attrs
              for f in [view.figures(t)] if f.ok and f.curve]
    if not curves:
        return ""
    depths = curves[0][1].curve.depths
    rows = []
    for n, f in curves:
        if f.curve.depths == depths:
            rows.append([str(n), names.get(n, ""), *(f"{tg:.1f}" for tg in f.curve.tg_rates()),
                         *(f"{pp:.0f}" for pp in f.curve.pp_rates())])
    columns = (["#", "preset"] + [f"tg d{d}" for d in depths]
               + [f"pp to d{b}" for b in depths[1:]])
    return "depth curves (t/s; d = tokens already in the context):\n" + markdown_table(rows, columns)


def presets_table(view: StudyView) -> str:
    """The presets and baselines side by side."""
    columns, rows = preset_rows(view)
    if not view.presets:
        return "no feasible configuration was measured: no presets (see the trials for why)"
    return markdown_table(rows, columns)


def why_lines(view: StudyView) -> str:
    """Why each preset was chosen, and which KV cache types none may use."""
    lines = [f"- {name}: {p.why}" for name, p in view.presets.items()]
    race = view.race
    if race is None:
        lines.append("- no confirmation race has run: presets are baselines only (run `tune` again to race)")
    elif not race.get("complete"):
        lines.append(f"- the confirmation race was cut after {race.get('rounds')} rounds: run `tune` again to "
                     "finish it")
    excluded = excluded_note(view.kv_quality)
    lines += [f"- {line}" for line in speculative_lines(view)]
    return "\n".join(lines + ([f"- {excluded}"] if excluded else []))


def speculative_lines(view: StudyView) -> list[str]:
    """For each preset that decodes speculatively: its acceptance, and its seconds per answer (scenarios) or tg
    against the same settings without speculation where the study measured them."""
    from dataclasses import replace

    from llama_tuner.measure.config import SERVER_DEFAULTS
    from llama_tuner.study.presets import gain as gain_of

    out = []
    figure = "answer" if view.workload == SCENARIOS else "tg"
    plain = {}
    for c in view.candidates:
        cfg = c.figures.config
        if not cfg.speculative:
            plain.setdefault(cfg.settings_key(), c)
    for name, p in view.presets.items():
        f = p.candidate.figures
        if not f.config.speculative:
            continue
        s = f.answer_summary
        drafted = f"{100 * f.acceptance:.0f}% of {f.draft_n:,} drafted tokens accepted" if f.draft_n else \
            "nothing drafted"
        per = f", {s.median_s:.2f} s per answer" if s else f", tg {f.tg_mean:.2f} t/s"
        base = replace(f.config, **SERVER_DEFAULTS)
        twin = plain.get(base.settings_key())
        if twin is None:
            against = "; the same settings without it were not measured in this study"
        else:
            ts = twin.figures.answer_summary
            theirs = f"{ts.median_s:.2f} s per answer" if ts else f"tg {twin.figures.tg_mean:.2f} t/s"
            against = (f"; without it (trial {twin.trial}): {theirs}, "
                       f"{gain_of(p.candidate, twin, figure).text()} with it")
        out.append(f"{name} decodes with --spec-type {f.config.spec_type}: {drafted}{per}{against}")
    return out


def study_description(view: StudyView) -> str:
    """The study in markdown for its MLflow parent run: what was tuned, the presets with their gains over the
    baselines and why they won, and the llama-server command of each."""
    commands = "\n".join(f"**{name}**\n\n```\n"
                         + llama_server_command(view.model_path, p.candidate.figures.config,
                                                cache_ram_mib=host_cache_mib(view, p.candidate)) + "\n```"
                         for name, p in view.presets.items())
    return "\n\n".join(["### " + header(view).replace("\n", "\n\n"), "#### Presets", presets_table(view),
                         why_lines(view), "#### llama-server", commands or "no feasible configuration"])


def full_report(view: StudyView) -> str:
    """Header, trials, presets, the reasons for them, and the presets' depth curves (curve workloads)."""
    parts = [header(view), "trials:\n" + trials_table(view), "presets:\n" + presets_table(view), why_lines(view)]
    return "\n\n".join(parts + [t for t in [depth_curve_table(view), kv_answers_table(view)] if t])


def kv_answers_table(view: StudyView) -> str:
    """The scenarios: each KV cache type's answers against f16's ("" for other workloads)."""
    if view.workload != SCENARIOS:
        return ""
    results = [view.figures(t) for t in view.trials if REUSED_ATTR not in t.user_attrs]
    return agreement_table([r for r in results if r is not None], view.kv_quality)
