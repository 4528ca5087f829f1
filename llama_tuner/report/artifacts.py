"""A study's tables as files: trials (CSV), presets (JSON), llama-server commands (text)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from llama_tuner.report.export import host_cache_mib, llama_server_command, study_preset_json
from llama_tuner.study.objectives import trial_summary
from llama_tuner.study.view import StudyView


def write_tables(view: StudyView, out: Path) -> dict[str, float]:
    """Write trials.csv, presets.json and llama-server-commands.txt into ``out``; return summary metrics."""
    pd.DataFrame([trial_summary(t) for t in view.trials]).to_csv(out / "trials.csv", index=False)
    presets, commands = {}, []
    for name, p in view.presets.items():
        presets[name] = study_preset_json(view, name)
        command = llama_server_command(view.model_path, p.candidate.figures.config,
                                       cache_ram_mib=host_cache_mib(view, p.candidate))
        commands.append(f"# {name}: {p.why}\n{command}\n")
    (out / "presets.json").write_text(json.dumps(presets, indent=2))
    (out / "llama-server-commands.txt").write_text("\n".join(commands) or "# no feasible configuration\n")
    summary = {"configurations_measured": float(len(view.candidates))}
    if "fastest" in view.presets:
        f = view.presets["fastest"].candidate.figures
        summary.update(best_tg_tps=f.tg_mean, best_pp_tps=f.pp_mean)
    return summary
