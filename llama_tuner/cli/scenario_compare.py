"""``compare --prompts``: each study's preset answering the same requests, side by side (see
:mod:`llama_tuner.report.scenario_compare`)."""

from __future__ import annotations

import os
from dataclasses import replace

import click

from llama_tuner.errors import UserError


def compare_scenarios(views, preset: str, prompts: str | None, *, max_tokens: int | None = None,
                      llama_server: str | None = None) -> str:
    """The side-by-side text of ``views``' ``preset`` answering the requests of ``prompts`` (None: the bundled
    file). A scenarios study's own answers are used for the requests it answered under the same names (its
    requests may differ: the notes say how); every other request is answered now by the preset in llama-server,
    one study after the other.

    Raises:
        UserError: a study without that preset, a twin, a bad file, no llama-server where one is needed.
    """
    from llama_tuner.measure.scenarios import Scenario, capped_to, load_scenarios, refuse_twin
    from llama_tuner.model.info import load_model_info
    from llama_tuner.report.scenario_compare import ScenarioSide, scenario_compare_text
    from llama_tuner.study.keys import SCENARIOS_ATTR

    scenarios = capped_to(load_scenarios(prompts), max_tokens)
    wanted = [s.name for s in scenarios]
    given = {s.name: s for s in scenarios}
    plans = []
    for view in views:
        p = view.presets.get(preset)
        if p is None:
            raise UserError(f"study {view.name!r} has no {preset} preset", f"see `llama-tuner report {view.name}`")
        stored = {a.name: a for a in p.candidate.figures.answers or []} if view.workload == "scenarios" else {}
        own = {d["name"]: Scenario.from_dict(d) for d in view.attrs.get(SCENARIOS_ATTR) or []}
        missing = [s for s in scenarios if s.name not in stored]
        if missing:
            refuse_twin(load_model_info(view.model_path))
        plans.append((view, p, stored, own, missing))
    server = None
    if any(missing for *_, missing in plans):
        from llama_tuner.cli.bench import llama_server_for_engine

        server = llama_server_for_engine(llama_server)
    labels = _labels(views)
    sides = []
    for (view, p, stored, own, missing), label in zip(plans, labels):
        answers = [a for a in p.candidate.figures.answers or [] if a.name in wanted and a.name not in
                   {m.name for m in missing}]
        notes = []
        differ = [s.name for s in scenarios
                  if s.name in own and s.name in stored and own[s.name].to_dict() != s.to_dict()]
        if differ:
            which = ", ".join(differ) if len(differ) <= 3 else f"{len(differ)} of these names"
            notes.append(f"its own requests of {which} differ from the file's "
                         f"({differ[0]}: {_difference(own[differ[0]], given[differ[0]])})")
        if missing:
            click.echo(f"{label}: answering {len(missing)} requests with its {preset} preset in llama-server...",
                       err=True)
            answers += _answer_now(server, view, p.candidate.figures.config, missing)
        source = ("the study's own answers" if not missing else
                  f"answered now by its {preset} preset" if not stored else
                  f"the study's own answers, and {len(missing)} answered now")
        sides.append(ScenarioSide(label=label, study=view.name, model=view.model_file, preset=preset,
                                  answers=answers, source=source, notes=notes))
    try:
        return scenario_compare_text(sides)
    except ValueError:
        raise UserError("the studies answered none of the file's requests in common",
                        "give a --prompts file whose requests they answered, or none to answer it now") from None


def _labels(views) -> list[str]:
    models = [v.model_file for v in views]
    return [v.name if models.count(v.model_file) > 1 else v.model_file for v in views]


def _difference(own, given) -> str:
    diffs = [k for k in ("messages", "prompt", "max_tokens", "sampling") if getattr(own, k) != getattr(given, k)]
    detail = f"max_tokens {own.max_tokens} against {given.max_tokens}" if diffs == ["max_tokens"] else \
        ", ".join(diffs)
    return detail


def _answer_now(server, view, config, scenarios) -> list:
    """``scenarios`` answered by ``config`` (the preset) in llama-server, one pass.

    Raises:
        UserError: the preset failed to answer (the server's decisive line).
    """
    from llama_tuner.measure.probe import detect_probe
    from llama_tuner.measure.scenarios import context_for, test_sizes
    from llama_tuner.measure.server_engine import ServerLauncher

    n_prompt, n_gen = test_sizes(scenarios)
    cfg = replace(config, workload="scenarios", n_prompt=n_prompt, n_gen=n_gen, n_depth=0, repetitions=1,
                  n_ctx=max(config.n_ctx, context_for(scenarios)))
    launcher = ServerLauncher(server, detect_probe(), scenarios=scenarios)
    [result] = launcher.measure(os.path.abspath(view.model_path), [cfg])
    if not result.ok:
        raise UserError(f"study {view.name!r}'s preset did not answer: {result.status.value}: {result.reason}",
                        f"see `llama-tuner verify {view.name}`")
    return result.answers
