"""The user's own scenarios: real requests answered for real, and what each answer cost.

A scenario file is JSONL, one request a line (blank lines and lines starting with ``#`` are skipped):

- ``{"messages": [{"role": "user", "content": "..."}, ...]}``: a chat, rendered by the model's own template in
  llama-server (``/v1/chat/completions``, whose reasoning parsing splits thinking from the answer);
- ``{"prompt": "..."}``: raw text, completed as given (``/completion``);

with optional ``name``, ``max_tokens`` (default :data:`DEFAULT_MAX_TOKENS`) and sampling keys
(:data:`SAMPLING_KEYS`); without them, sampling is greedy. Each request is answered until the model's end of turn or
``max_tokens`` (a capped answer), streamed, and measured as an :class:`Answer`.

:class:`Answer` is what one request cost and what it said: prompt tokens, time to the first token, tokens written
(thinking and answer apart), time to the answer's first token, seconds to the end, whether it hit the cap, the
server's own timings (pp and tg) and speculative drafts, and the text. Nothing here imports llama_cpp.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy

from llama_tuner.errors import UserError
from llama_tuner.model.info import ModelInfo

DEFAULT_MAX_TOKENS = 4096
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty", "stop")
KNOWN_KEYS = ("name", "messages", "prompt", "max_tokens") + SAMPLING_KEYS
ROLES = ("system", "user", "assistant")
BUNDLED_FILE = os.path.join(os.path.dirname(__file__), "scenarios.jsonl")
TEMPLATE_TOKENS = 16  # a chat template's own tokens per message (role markers), for the context estimate
CHARS_PER_TOKEN = 3  # a cautious estimate (English runs near 4): the context must hold the longest request


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One request of a scenario file: a chat (``messages``) or raw text (``prompt``), its cap and sampling."""

    name: str
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: dict[str, Any] = field(default_factory=dict)  # the line's own; empty: greedy
    line: int = 0

    @property
    def is_chat(self) -> bool:
        """True for a chat (rendered by the model's template), False for raw text."""
        return bool(self.messages)

    def chars(self) -> int:
        """The request's characters (its messages' contents, or its prompt)."""
        return sum(len(m["content"]) for m in self.messages) if self.messages else len(self.prompt)

    def prompt_tokens_estimate(self) -> int:
        """A cautious guess of its prompt tokens (characters / 3, plus the template's), for the context's size;
        the server's count is what is recorded."""
        return -(-self.chars() // CHARS_PER_TOKEN) + TEMPLATE_TOKENS * max(1, len(self.messages))

    def to_dict(self) -> dict[str, Any]:
        """The request as a scenario line (JSON-ready)."""
        d: dict[str, Any] = {"name": self.name}
        if self.messages:
            d["messages"] = [dict(m) for m in self.messages]
        else:
            d["prompt"] = self.prompt
        return {**d, "max_tokens": self.max_tokens, **self.sampling}

    @classmethod
    def from_dict(cls, d: dict[str, Any], line: int = 0) -> "Scenario":
        """The request of one parsed line (see :func:`parse_line`)."""
        return parse_line(json.dumps(d), line or 1, set())


def parse_line(text: str, number: int, names: set[str]) -> Scenario:
    """The request of line ``number`` (its text), named ``request-<number>`` where it has no name; ``names``: those
    taken by earlier lines (this one's is added).

    Raises:
        UserError: the line is not a JSON object of a known shape, naming the line and what is wrong.
    """
    where = f"line {number}"
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{where} is not JSON ({exc.msg} at column {exc.colno})",
                        'write one JSON object a line, e.g. {"prompt": "Hi"}') from None
    if not isinstance(d, dict):
        raise UserError(f"{where} is a JSON {type(d).__name__}, not an object",
                        'write one JSON object a line, e.g. {"prompt": "Once upon a time"}')
    unknown = sorted(set(d) - set(KNOWN_KEYS))
    if unknown:
        raise UserError(f"{where} has an unknown key {unknown[0]!r}", f"use only {', '.join(KNOWN_KEYS)}")
    if ("messages" in d) == ("prompt" in d):
        raise UserError(f"{where} needs exactly one of messages and prompt", 'give "messages" (a chat) or '
                        '"prompt" (raw text)')
    messages: tuple[dict[str, str], ...] = ()
    prompt = ""
    if "messages" in d:
        raw = d["messages"]
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where}: messages must be a non-empty list", 'write "messages": [{"role": "user", '
                            '"content": "..."}]')
        for i, m in enumerate(raw, 1):
            if (not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str)
                    or set(m) - {"role", "content"}):
                raise UserError(f"{where}: message {i} is not {{\"role\": ..., \"content\": \"...\"}}",
                                f"give each message a role ({', '.join(ROLES)}) and a content string")
        if raw[-1]["role"] == "assistant":
            raise UserError(f"{where}: the last message is the assistant's, so there is nothing to answer",
                            "end the messages with a user message")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in raw)
    else:
        prompt = d["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{where}: prompt must be a non-empty string", 'write "prompt": "some text"')
    max_tokens = d.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"{where}: max_tokens {max_tokens!r} is not a whole number above 0",
                        f'write "max_tokens": 1024, or leave it out ({DEFAULT_MAX_TOKENS})')
    name = d.get("name", f"request-{number}")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: name {name!r} is not a non-empty string", "give the request a short name")
    name = name.strip()
    if name in names:
        raise UserError(f"{where}: the name {name!r} is taken by an earlier line", "give each request its own name")
    names.add(name)
    sampling = {k: d[k] for k in SAMPLING_KEYS if k in d}
    for key in ("temperature", "top_p", "min_p", "repeat_penalty"):
        if key in sampling and (isinstance(sampling[key], bool) or not isinstance(sampling[key], (int, float))):
            raise UserError(f"{where}: {key} {sampling[key]!r} is not a number", f"write \"{key}\": 0.7")
    return Scenario(name=name, messages=messages, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                    line=number)


def parse_scenarios(text: str, source: str = "the scenario file") -> tuple[Scenario, ...]:
    """Every request of a scenario file's ``text``.

    Raises:
        UserError: a bad line (named by its number), or no request at all.
    """
    out, names = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            out.append(parse_line(stripped, number, names))
        except UserError as exc:
            raise UserError(f"{source}: {exc.problem}", exc.fix) from None
    if not out:
        raise UserError(f"{source} holds no request", 'write one JSON object a line, e.g. {"prompt": "Hello"}')
    return tuple(out)


def load_scenarios(path: str | None = None) -> tuple[Scenario, ...]:
    """The requests of the scenario file at ``path`` (None: the bundled one, :data:`BUNDLED_FILE`).

    Raises:
        UserError: the file cannot be read, or a line is bad (named by its number).
    """
    path = path or BUNDLED_FILE
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(f"--prompts {path} cannot be read ({why})", "give a JSONL file, one request a line") from None
    return parse_scenarios(text, f"--prompts {path}")


def scenarios_sha256(scenarios: Sequence[Scenario]) -> str:
    """A short hash of the requests (what a study's figures depend on)."""
    payload = json.dumps([s.to_dict() for s in scenarios], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def scenarios_of(lines: Sequence[dict[str, Any]]) -> tuple[Scenario, ...]:
    """The requests stored as :meth:`Scenario.to_dict` lines (a study's), numbered from 1."""
    return tuple(Scenario.from_dict(d, i) for i, d in enumerate(lines, 1))


def context_for(scenarios: Sequence[Scenario]) -> int:
    """A context that holds the longest request and the largest cap (:func:`test_sizes`), in whole 1024s."""
    return -(-sum(test_sizes(scenarios)) // 1024) * 1024


def test_sizes(scenarios: Sequence[Scenario]) -> tuple[int, int]:
    """(prompt tokens, generated tokens) a context must hold for the longest request: the largest prompt estimate
    and the largest cap."""
    return (max(s.prompt_tokens_estimate() for s in scenarios), max(s.max_tokens for s in scenarios))


@dataclass(kw_only=True)
class Answer:
    """One request answered: what it cost and what it said.

    Times are the client's, from sending the request: ``first_token_s`` to the first token written (thinking or
    answer), ``answer_start_s`` to the answer's first (None where nothing but thinking came), ``seconds`` to the
    end. Tokens are the server's: ``prompt_tokens``, ``generated_tokens`` (all it wrote), of them
    ``thinking_tokens`` (its ``reasoning_content``, tokenized) and the rest ``answer_tokens``. ``prompt_ms`` and
    ``predicted_ms`` are its own timings of the prompt and of the generation after the first token (``predicted_n
    - 1`` decode steps); ``draft_n`` and ``draft_accepted`` its speculative drafts. ``capped``: it stopped at
    ``max_tokens``, not at the model's end of turn. ``tokens``: the written text's token ids, where the tokenizer
    answered (for comparing answers token by token)."""

    name: str
    repetition: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    thinking_tokens: int = 0
    first_token_s: float | None = None
    answer_start_s: float | None = None
    seconds: float = 0.0
    capped: bool = False
    finish: str = ""
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    draft_n: int = 0
    draft_accepted: int = 0
    text: str = ""
    reasoning: str = ""
    tokens: list[int] = field(default_factory=list)

    @property
    def answer_tokens(self) -> int:
        """Tokens written that are not thinking."""
        return max(0, self.generated_tokens - self.thinking_tokens)

    @property
    def pp_tps(self) -> float | None:
        """The prompt's tokens per second, as the server timed them."""
        return 1e3 * self.prompt_tokens / self.prompt_ms if self.prompt_ms > 0 else None

    @property
    def tg_tps(self) -> float | None:
        """Generation tokens per second after the first token, as the server timed them."""
        return 1e3 * (self.predicted_n - 1) / self.predicted_ms if self.predicted_ms > 0 and self.predicted_n > 1 \
            else None

    @property
    def seconds_per_token(self) -> float | None:
        """Seconds from the first token written to the last, per token after the first (the client's clock)."""
        if self.first_token_s is None or self.generated_tokens < 2:
            return None
        return (self.seconds - self.first_token_s) / (self.generated_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` reverses it."""
        return asdict(self)

    def record(self, *, tokens: bool = True) -> dict[str, Any]:
        """:meth:`to_dict` with the figures derived from it (answer tokens, seconds per token, tg and pp), as the
        JSON output and the MLflow artifact show an answer; ``tokens`` False leaves the token ids out."""
        d = self.to_dict()
        if not tokens:
            del d["tokens"]
        return {**d, "answer_tokens": self.answer_tokens, "seconds_per_token": self.seconds_per_token,
                "tg_tps": self.tg_tps, "pp_tps": self.pp_tps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Answer":
        """Rebuild from :meth:`to_dict` output."""
        return cls(**d)


def passes(answers: Sequence[Answer]) -> list[list[Answer]]:
    """The answers grouped by repetition (one pass over the file each), in order."""
    out: dict[int, list[Answer]] = {}
    for a in answers:
        out.setdefault(a.repetition, []).append(a)
    return [out[k] for k in sorted(out)]


@dataclass(frozen=True)
class AnswerSummary:
    """A file's answers in a few figures: seconds per answer (median and p90 over the requests, each request's
    median over the passes), tokens written per answer (thinking apart), the capped share, and drafts."""

    requests: int
    median_s: float
    p90_s: float
    total_s: float
    generated_tokens: float  # per answer, mean
    thinking_tokens: float
    capped: int
    draft_n: int
    draft_accepted: int

    @property
    def capped_share(self) -> float:
        """The share of requests whose answer hit its cap."""
        return self.capped / self.requests if self.requests else 0.0

    @property
    def acceptance(self) -> float | None:
        """The share of drafted tokens accepted, None where nothing was drafted."""
        return self.draft_accepted / self.draft_n if self.draft_n else None


def per_request(answers: Sequence[Answer]) -> dict[str, list[Answer]]:
    """Each request's answers (one per pass), in the file's order."""
    out: dict[str, list[Answer]] = {}
    for a in answers:
        out.setdefault(a.name, []).append(a)
    return out


def summarize(answers: Sequence[Answer]) -> AnswerSummary | None:
    """The figures of a file's answers (None without any)."""
    if not answers:
        return None
    groups = per_request(answers)
    seconds = [statistics.median(a.seconds for a in g) for g in groups.values()]
    firsts = [g[0] for g in groups.values()]
    return AnswerSummary(requests=len(groups), median_s=statistics.median(seconds),
                         p90_s=float(numpy.quantile(seconds, 0.9)), total_s=sum(seconds),
                         generated_tokens=statistics.fmean(a.generated_tokens for a in firsts),
                         thinking_tokens=statistics.fmean(a.thinking_tokens for a in firsts),
                         capped=sum(1 for a in firsts if a.capped),
                         draft_n=sum(a.draft_n for a in answers), draft_accepted=sum(a.draft_accepted for a in answers))


def refuse_twin(model: ModelInfo) -> None:
    """Refuse a random-weight twin (:mod:`llama_tuner.model.twins`; ``ModelInfo.extra["twin"]``) for scenarios:
    its answers are noise.

    Raises:
        UserError: the model is a twin.
    """
    if model.extra.get("twin"):
        raise UserError(f"{model.file_name} is a random-weight twin: its answers are noise, so the "
                        "scenarios (seconds per answer, tokens written) would measure nothing of the real model",
                        "run the scenarios on the real model; a twin measures speed and memory (pp-tg, chat, long)")


def capped_to(scenarios: Sequence[Scenario], max_tokens: int | None) -> tuple[Scenario, ...]:
    """The requests with every cap at most ``max_tokens`` (None: as the file says).

    Raises:
        UserError: ``max_tokens`` is below 1.
    """
    if max_tokens is None:
        return tuple(scenarios)
    if max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens} lets no answer be written", "give --max-tokens 1 or more")
    from dataclasses import replace

    return tuple(replace(s, max_tokens=min(s.max_tokens, max_tokens)) for s in scenarios)
