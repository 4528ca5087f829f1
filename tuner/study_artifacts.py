"""A study's tables as files: trials (CSV), presets (JSON), llama-server commands (text)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tuner.export import llama_server_command, preset_json
from tuner.presets import gain
from tuner.records import trial_summary


def write_tables(view, out: Path) -> dict[str, float]:
    """Write trials.csv, presets.json and llama-server-commands.txt; return summary metrics."""
    pd.DataFrame([trial_summary(t) for t in view.trials]).to_csv(out / "trials.csv", index=False)
    model_path = view.attrs["model_path"]
    env = {k: v for k, v in view.attrs.get("environment", {}).items() if k != "system_info"}
    presets, commands = {}, []
    for name, p in view.presets.items():
        gains = {b: {"tg": gain(p.candidate, c, "tg"), "pp": gain(p.candidate, c, "pp")}
                 for b, c in view.baselines.items() if c.figures.ok}
        presets[name] = {**preset_json(name, p.candidate, model_path, view.name, env, gains), "why": p.why}
        commands.append(f"# {name}: {p.why}\n{llama_server_command(model_path, p.candidate.figures.config)}\n")
    (out / "presets.json").write_text(json.dumps(presets, indent=2))
    (out / "llama-server-commands.txt").write_text("\n".join(commands) or "# no feasible configuration\n")
    summary = {"configurations_measured": float(len(view.candidates))}
    if "fastest" in view.presets:
        f = view.presets["fastest"].candidate.figures
        summary.update(best_tg_tps=f.tg_mean, best_pp_tps=f.pp_mean)
    return summary
