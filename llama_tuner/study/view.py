"""A read-only view of a stored study: its trials, baselines, candidates and presets.

Export, report, compare and tracking all read studies through this one class, so
"which trials count" and "which presets win" are decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import optuna
from optuna.trial import FrozenTrial, TrialState

from llama_tuner.errors import UserError
from llama_tuner.study.comparison import speed
from llama_tuner.study.presets import MAX_CONTEXT_SHARE, Candidate, Preset, choose_presets, rank
from llama_tuner.model.facts import ModelFacts
from llama_tuner.study.keys import (BASELINE_ATTR, CONFIRM_PREFIX, ENVIRONMENT_ATTR, FINGERPRINT_ATTR,
                                    KV_QUALITY_ATTR, LIMITS_ATTR, MODEL_FACTS_ATTR, MODEL_FILE_ATTR, MODEL_PATH_ATTR,
                                    OBJECTIVE_ATTR, RACE_ATTR, REQUEST_ATTR)
from llama_tuner.study.objectives import Limits, is_feasible, result_of
from llama_tuner.study.quality_gate import allowed, why_not_allowed
from llama_tuner.measure.config import TEST_KEYS, BenchConfig, InvalidConfig
from llama_tuner.measure.result import Environment, TrialResult


@dataclass
class StudyView:
    """Everything about one study, computed from the storage on demand."""

    study: optuna.Study

    @classmethod
    def load(cls, storage, name: str) -> "StudyView":
        """Load study ``name``.

        Raises:
            UserError: there is no such study (the message names the existing ones), or it was not made by
                llama-tuner.
        """
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            names = optuna.get_all_study_names(storage=storage)
            hint = f"existing studies: {', '.join(names)}" if names else "run `llama-tuner tune MODEL` first"
            raise UserError(f"no study named {name!r} in this storage", hint) from None
        if not {FINGERPRINT_ATTR, LIMITS_ATTR, MODEL_PATH_ATTR} <= set(study.user_attrs):
            raise UserError(f"study {name!r} was not made by llama-tuner (it has no model, limits or fingerprint)",
                            "name a study that `llama-tuner tune` made")
        return cls(study)

    @property
    def name(self) -> str:
        """The study's name."""
        return self.study.study_name

    @property
    def attrs(self) -> dict:
        """The study's user attributes (model, limits, fingerprint, environment...)."""
        return self.study.user_attrs

    @cached_property
    def trials(self) -> list[FrozenTrial]:
        """Completed trials that carry a result, in order."""
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if result_of(t) is not None]

    @cached_property
    def limits(self) -> Limits:
        """The study's memory and context limits."""
        return Limits(**self.attrs[LIMITS_ATTR])

    @property
    def objective(self) -> str:
        """What "speed" means for the presets: tg, pp or balanced."""
        return self.attrs.get(OBJECTIVE_ATTR, "tg")

    @cached_property
    def environment(self) -> Environment:
        """The machine and build the study measured on."""
        return Environment(**self.attrs.get(ENVIRONMENT_ATTR, {}))

    @property
    def model_path(self) -> str:
        """Where the model file was when the study was made."""
        return self.attrs[MODEL_PATH_ATTR]

    @property
    def model_file(self) -> str:
        """The model file's name."""
        return self.attrs.get(MODEL_FILE_ATTR, "?")

    @cached_property
    def facts(self) -> ModelFacts:
        """The model's shapes and bytes, as stored when the study was made."""
        return ModelFacts.from_dict(self.attrs[MODEL_FACTS_ATTR])

    @cached_property
    def confirmations(self) -> dict[int, TrialResult]:
        """Re-measurements of the top candidates, by trial number."""
        return {int(k.removeprefix(CONFIRM_PREFIX)): TrialResult.from_dict(v)
                for k, v in self.attrs.items() if k.startswith(CONFIRM_PREFIX)}

    def figures(self, t: FrozenTrial) -> TrialResult:
        """A trial's measurement to trust: its confirmation where it has one."""
        return self._candidate(t).figures

    def _candidate(self, t: FrozenTrial) -> Candidate:
        return Candidate(t.number, result_of(t), self.confirmations.get(t.number), t.user_attrs.get(BASELINE_ATTR))

    @property
    def kv_quality(self) -> dict | None:
        """The KV cache quality record (:mod:`llama_tuner.study.quality_gate`), if the study has one."""
        return self.attrs.get(KV_QUALITY_ATTR)

    @cached_property
    def candidates(self) -> list[Candidate]:
        """Feasible completed trials, one per distinct configuration (the first that holds it), whose KV cache
        keeps to --max-kld: the race's entrants are chosen among these."""
        seen, out = set(), []
        for t in self.trials:
            r = result_of(t)
            key = r.config.settings_key()
            if key not in seen and is_feasible(r, self.limits) and allowed(r.config, self.kv_quality):
                seen.add(key)
                out.append(self._candidate(t))
        return out

    @cached_property
    def baselines(self) -> dict[str, Candidate]:
        """Each baseline's measurement (feasible or not) by name: the latest trial of that name (a --baseline
        changed on resume is measured anew)."""
        out = {}
        for t in self.trials:
            name = t.user_attrs.get(BASELINE_ATTR)
            if name:
                out[name] = self._candidate(t)
        return out

    @cached_property
    def pins(self) -> dict[str, object]:
        """The study's --set pins, typed (test sizes left out: baselines are measured with them anyway)."""
        raw = (self.attrs.get(REQUEST_ATTR) or {}).get("pins") or {}
        try:
            typed = BenchConfig.from_dict(raw).to_dict()
        except (InvalidConfig, TypeError, ValueError):
            return {}
        return {k: typed[k] for k in raw if k in typed and k not in TEST_KEYS}

    def why_not_kept(self, baseline: Candidate) -> str | None:
        """Why a baseline cannot be a preset (it failed, breaks a limit, a pin or --max-kld), or None."""
        f = baseline.figures
        if not f.ok:
            return f"it did not run ({f.status.value})"
        if not is_feasible(f, self.limits):
            return "it breaks the study's limits (budget, headroom or minimum context)"
        kv = why_not_allowed(f.config, self.kv_quality)
        if kv:
            return kv
        broken = [f"{k}={v}" for k, v in self.pins.items() if getattr(f.config, k) != v]
        return f"it breaks the pins ({', '.join(broken)})" if broken else None

    @cached_property
    def kept_baselines(self) -> list[Candidate]:
        """The baselines a preset may be: those that ran, within the limits, --max-kld and the pins."""
        return [b for b in self.baselines.values() if self.why_not_kept(b) is None]

    @property
    def race(self) -> dict | None:
        """The latest confirmation race: its batch, trials, rounds and whether it finished (None: none ran)."""
        race = self.attrs.get(RACE_ATTR)
        if race:
            return race
        batches = {r.interleaved.batch for r in self.confirmations.values() if r.interleaved}
        if not batches:
            return None
        batch = max(batches, key=lambda b: float(b.split(":")[-2]) if b.count(":") >= 2 else 0.0)  # older studies
        trials = sorted(n for n, r in self.confirmations.items() if r.interleaved and r.interleaved.batch == batch)
        return {"batch": batch, "trials": trials, "rounds": None, "complete": True}

    @cached_property
    def entrants(self) -> list[Candidate]:
        """Configurations confirmed in the latest race: raced there, every round ran, within the limits
        (peak memory as raced) and --max-kld; baselines are not among them."""
        race = self.race
        if race is None:
            return []
        out = []
        for c in self.candidates:
            r = c.confirm
            if (c.baseline is None and r is not None and r.interleaved is not None
                    and r.interleaved.batch == race["batch"] and r.ok and is_feasible(r, self.limits)):
                out.append(c)
        return out

    def top(self, n: int) -> list[int]:
        """Trial numbers of the ``n`` fastest feasible candidates that are not baselines."""
        return [c.trial for c in rank([c for c in self.candidates if not c.baseline], self.objective)[:n]]

    def leaders(self, n: int) -> list[int]:
        """Who races: the ``n`` fastest feasible candidates, the one that would be max-context (the largest
        context at MAX_CONTEXT_SHARE of the fastest) and the best balanced one, and every baseline a preset may
        be, so that a preset is shown faster than today's settings only when it beats them round by round."""
        pool = [c for c in self.candidates if not c.baseline]
        top = self.top(n)
        if pool:
            ranked = rank(pool, self.objective)
            floor = MAX_CONTEXT_SHARE * speed(ranked[0].figures, self.objective)[0]
            fast = [c for c in ranked if speed(c.figures, self.objective)[0] >= floor] or ranked
            longest = max(fast, key=lambda c: c.n_ctx)  # the fastest of the longest: ranked is fastest first
            top += [longest.trial]
            unconfirmed = choose_presets(pool, [], self.objective, self.limits.budget_bytes)
            if "balanced" in unconfirmed:
                top += [unconfirmed["balanced"].candidate.trial]
        top += [b.trial for b in self.kept_baselines]
        return list(dict.fromkeys(top))

    @property
    def workload(self) -> str:
        """What every trial measured (llama_tuner.measure.workloads): pp-tg unless the study asked for another."""
        return (self.attrs.get(REQUEST_ATTR) or {}).get("workload") or "pp-tg"

    @cached_property
    def presets(self) -> dict[str, Preset]:
        """fastest, max-context and balanced, from the race's entrants and the baselines a preset may be
        (empty when there is neither)."""
        return choose_presets(self.entrants, self.kept_baselines, self.objective, self.limits.budget_bytes)

    def preset(self, name: str) -> Preset:
        """Preset ``name``.

        Raises:
            UserError: the study has no feasible configuration, so no preset.
        """
        if name not in self.presets:
            raise UserError(f"study {self.name!r} has no confirmed configuration and no baseline a preset may be, "
                            f"so no {name} preset", f"see `llama-tuner report {self.name}` for why")
        return self.presets[name]
