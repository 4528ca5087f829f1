"""Text reports of a study: its trials, its presets, and their gains over the baselines."""

from __future__ import annotations

from tuner.report.export import llama_server_command
from tuner.study.presets import gain
from tuner.study.quality_gate import excluded_note, kld_text
from tuner.study.keys import BASELINE_ATTR, REUSED_ATTR
from tuner.study.objectives import result_of
from tuner.study.view import StudyView
from tuner.report.tables import markdown_table
from tuner.units import format_size

TRIAL_COLUMNS = ("#", "status", "ngl", "n_ctx", "batch", "ubatch", "threads", "fa", "K/V", "repack", "tg t/s",
                 "pp t/s", "GB/s", "peak mem", "predicted", "headroom", "feasible", "note")
PRESET_COLUMNS = ("preset", "trial", "ngl", "n_ctx", "batch", "ubatch", "threads", "fa", "K/V", "repack",
                  "tg t/s", "pp t/s", "peak mem", "headroom", "KV KLD")


def _rate(rates) -> str:
    return f"{rates.mean:.2f} ± {rates.stddev:.2f}" if rates and rates.samples_ns else "-"


def _settings(c) -> list[str]:
    threads = str(c.n_threads) if c.n_threads == c.n_threads_batch else f"{c.n_threads}/{c.n_threads_batch}"
    return [str(c.n_gpu_layers), str(c.n_ctx), str(c.n_batch), str(c.n_ubatch), threads, str(int(c.flash_attn)),
            f"{c.type_k}/{c.type_v}", str(int(c.repack))]


def header(view: StudyView) -> str:
    """Two lines: what was tuned where, and under which limits."""
    env, lim = view.environment, view.limits
    where = env.gpu_name or f"{env.cpu}, {env.physical_cores} cores"
    measured = sum(1 for t in view.trials if REUSED_ATTR not in t.user_attrs)
    return (f"study {view.name}: {view.attrs.get('model_file')} on {where}; llama-cpp-python "
            f"{env.llama_cpp_python}, {env.llama_cpp_build}\n"
            f"objective {view.objective}; budget {format_size(lim.budget_bytes)}, min headroom "
            f"{format_size(lim.min_headroom_bytes)}, min ctx {lim.min_ctx}; {measured} configurations measured")


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
        rows.append([str(t.number), r.status.value, *_settings(r.config), _rate(r.tg), _rate(r.pp), gbs,
                     format_size(r.peak_memory_bytes), format_size(r.predicted_peak_bytes),
                     format_size(r.headroom_bytes), "yes" if feasible else "no", "; ".join(notes)])
    return markdown_table(rows, TRIAL_COLUMNS)


def preset_rows(view: StudyView) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the presets table, with the gain over each baseline in %."""
    bases = {n: c for n, c in view.baselines.items() if c.figures.ok}
    columns = list(PRESET_COLUMNS) + [f"tg vs {n}" for n in bases] + [f"pp vs {n}" for n in bases]
    rows = []
    for name, p in view.presets.items():
        f = p.candidate.figures
        rows.append([name, str(p.candidate.trial), *_settings(f.config), _rate(f.tg), _rate(f.pp),
                     format_size(f.peak_memory_bytes), format_size(f.headroom_bytes),
                     kld_text(f.config, view.kv_quality)]
                    + [f"{100 * gain(p.candidate, b, 'tg'):+.1f}%" for b in bases.values()]
                    + [f"{100 * gain(p.candidate, b, 'pp'):+.1f}%" for b in bases.values()])
    for name, b in view.baselines.items():
        f = b.figures
        rows.append([f"(baseline) {name}", str(b.trial), *_settings(f.config), _rate(f.tg) if f.ok else f.status.value,
                     _rate(f.pp) if f.ok else "-", format_size(f.peak_memory_bytes), format_size(f.headroom_bytes),
                     kld_text(f.config, view.kv_quality)]
                    + [""] * (2 * len(bases)))
    return columns, rows


def presets_table(view: StudyView) -> str:
    """The presets and baselines side by side."""
    columns, rows = preset_rows(view)
    if not view.presets:
        return "no feasible configuration was measured: no presets (see the trials for why)"
    return markdown_table(rows, columns)


def why_lines(view: StudyView) -> str:
    """Why each preset was chosen, and which KV cache types none may use."""
    lines = [f"- {name}: {p.why}" for name, p in view.presets.items()]
    excluded = excluded_note(view.kv_quality)
    return "\n".join(lines + ([f"- {excluded}"] if excluded else []))


def study_description(view: StudyView) -> str:
    """The study in markdown for its MLflow parent run: what was tuned, the presets with their gains over the
    baselines and why they won, and the llama-server command of each."""
    commands = "\n".join(f"**{name}**\n\n```\n{llama_server_command(view.model_path, p.candidate.figures.config)}\n```"
                         for name, p in view.presets.items())
    return "\n\n".join(["### " + header(view).replace("\n", "\n\n"), "#### Presets", presets_table(view),
                         why_lines(view), "#### llama-server", commands or "no feasible configuration"])


def full_report(view: StudyView) -> str:
    """Header, trials, presets and the reasons for them."""
    return "\n\n".join([header(view), "trials:\n" + trials_table(view), "presets:\n" + presets_table(view),
                        why_lines(view)])
