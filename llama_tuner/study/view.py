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
from llama_tuner.study.presets import Candidate, Preset, choose_presets, rank
from llama_tuner.model.facts import ModelFacts
from llama_tuner.study.keys import (BASELINE_ATTR, CONFIRM_PREFIX, ENVIRONMENT_ATTR, KV_QUALITY_ATTR, LIMITS_ATTR,
                              MODEL_FACTS_ATTR, MODEL_FILE_ATTR, MODEL_PATH_ATTR, OBJECTIVE_ATTR, REQUEST_ATTR)
from llama_tuner.study.objectives import Limits, is_feasible, result_of
from llama_tuner.study.quality_gate import allowed
from llama_tuner.measure.result import Environment, TrialResult


@dataclass
class StudyView:
    """Everything about one study, computed from the storage on demand."""

    study: optuna.Study

    @classmethod
    def load(cls, storage, name: str) -> "StudyView":
        """Load study ``name``.

        Raises:
            UserError: there is no such study (the message names the existing ones).
        """
        try:
            return cls(optuna.load_study(study_name=name, storage=storage))
        except KeyError:
            names = optuna.get_all_study_names(storage=storage)
            hint = f"existing studies: {', '.join(names)}" if names else "run `llama-tuner tune MODEL` first"
            raise UserError(f"no study named {name!r} in this storage", hint) from None

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
        keeps to --max-kld: presets are chosen among these."""
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
        """Each baseline's measurement (feasible or not) by name."""
        out = {}
        for t in self.trials:
            name = t.user_attrs.get(BASELINE_ATTR)
            if name and name not in out:
                out[name] = self._candidate(t)
        return out

    def top(self, n: int) -> list[int]:
        """Trial numbers of the ``n`` fastest feasible candidates."""
        return [c.trial for c in rank(self.candidates, self.objective)[:n]]

    def leaders(self, n: int) -> list[int]:
        """The ``n`` fastest feasible candidates and the fastest feasible baseline, which is confirmed with
        them so that a preset is shown faster than today's settings only when it beats them round by round."""
        top = self.top(n)
        base = next((c.trial for c in rank(self.candidates, self.objective) if c.baseline), None)
        return top + [base] if base is not None and base not in top else top

    @property
    def workload(self) -> str:
        """What every trial measured (llama_tuner.measure.workloads): pp-tg unless the study asked for another."""
        return (self.attrs.get(REQUEST_ATTR) or {}).get("workload") or "pp-tg"

    @cached_property
    def presets(self) -> dict[str, Preset]:
        """fastest, max-context and balanced (empty if nothing feasible was measured)."""
        return choose_presets(self.candidates, self.objective, self.limits.budget_bytes)

    def preset(self, name: str) -> Preset:
        """Preset ``name``.

        Raises:
            UserError: the study has no feasible configuration, so no preset.
        """
        if name not in self.presets:
            raise UserError(f"study {self.name!r} has no feasible configuration, so no {name} preset",
                            f"see `llama-tuner report {self.name}` for why its trials failed")
        return self.presets[name]
