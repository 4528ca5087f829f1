"""A study's workload replayed over HTTP in a real llama-server: what the server itself reports.

:func:`serve_and_measure` starts llama-server with the given arguments on a free loopback port, waits for
``/health``, sends the workload to ``/completion`` as lists of token ids and reads each answer's ``timings``
(llama.cpp's ``tools/server``: ``prompt_n`` and ``prompt_ms`` from the first prompt token to the first sampled
token; ``predicted_n`` and ``predicted_ms`` from there to the last one, over ``predicted_n - 1`` decode steps,
since the first token comes from the prompt's logits), samples its memory, then stops it: SIGINT, then SIGKILL.

The tests are the study's, as its measuring child runs them (:mod:`llama_tuner.measure.timer`):

- ``pp-tg``: pp is a prompt of ``n_prompt`` token ids and one token (``prompt_per_second``); tg a prompt of one
  token and ``n_gen + 1`` predicted with ``ignore_eos``, so ``n_gen`` decode steps (``predicted_per_second``).
  With ``n_depth``, the prompt follows ``n_depth`` ids sent first with ``cache_prompt`` (the server processes
  only the rest, which ``prompt_n`` shows), and tg's prompt is ``n_depth`` ids; without it ``cache_prompt`` is
  off.
- curve workloads (chat, reasoning, long, custom): one request per repetition, the prompt after the depth, then
  ``n_gen + 1`` tokens: the answer timed directly, not as a depth curve.
- ``server``: ``n_parallel`` such requests at once; the aggregate pp is every stream's prompt tokens over the
  longest prompt time, the aggregate tg the sum of the streams' rates (they decode together in the server's
  batch).

Token ids are seeded random normal tokens of the model's vocabulary (its GGUF header's token types; never a
control, unused or byte token), BOS first where the model adds one, as llama-bench draws them; sampling is greedy
(``top_k`` 1). A server that does not start, crashes or stops answering is a result with the decisive line of
its log, not an exception. This module imports nothing of llama_cpp and speaks HTTP with the standard library.
"""

from __future__ import annotations

import http.client
import json
import mmap
import os
import random
import re
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import psutil

from llama_tuner.measure.buffers import buffers_of
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.launcher import OOM_PATTERN
from llama_tuner.measure.peak_memory import MemorySampler
from llama_tuner.measure.probe import GpuProbe, NoGpuProbe
from llama_tuner.measure.result import Interleaved, Rates, Status, TrialResult
from llama_tuner.measure.scenarios import Answer, Scenario
from llama_tuner.measure.workloads import SCENARIOS, is_curve
from llama_tuner.model.gguf_header import read_gguf_header

HOST = "127.0.0.1"
START_TIMEOUT_S = 600.0  # loading a large model from a cold disk
REQUEST_TIMEOUT_S = 1800.0  # a reasoning workload's 4,096 tokens on a slow CPU
STOP_GRACE_S = 10.0  # after SIGINT, before SIGKILL
WARMUP_TOKENS = 16
NORMAL_TOKEN = 1  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL in tokenizer.ggml.token_type
OK, START_FAILED, CRASH, TIMEOUT, ERROR = "ok", "start_failed", "crash", "timeout", "error"
# The log lines that say why llama-server stopped, strongest first (asserts and C++ aborts, then llama.cpp's
# errors, then the rest); within one kind the first line wins: later ones are its consequences.
_DECISIVE = [re.compile(p, re.IGNORECASE) for p in (
    r"GGML_ASSERT|GGML_ABORT|terminate called|what\(\)|Segmentation fault|out of memory|bad_alloc",
    r"\berror\b",
    r"failed|cannot|invalid|unknown|exception|Aborted")]
_HARMLESS = re.compile(r"load_backend: failed to find|failed to open .*\.so", re.IGNORECASE)  # backend probing
_BIND = re.compile(r"couldn't bind|address already in use", re.IGNORECASE)


class ServerStopped(Exception):
    """llama-server stopped answering: it died, timed out or sent no timings (the message says which)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, kw_only=True)
class Replay:
    """The workload to replay: the study's test sizes and how many repetitions of each test per server start."""

    workload: str = "pp-tg"
    n_prompt: int = 512
    n_gen: int = 128
    n_depth: int = 0
    n_parallel: int = 1
    repetitions: int = 5
    seed: int = 42
    # pp-tg only: a request in words, sent as one user message through the model's chat template, whose answer is
    # the tg test (real text, where speculative decoding is judged); "" draws tg's prompt from the vocabulary
    text: str = ""
    # scenarios only: the requests answered, each once per repetition (llama_tuner.measure.scenarios)
    scenarios: tuple[Scenario, ...] = ()

    @classmethod
    def of(cls, config: BenchConfig, *, repetitions: int | None = None, text: str = "",
           scenarios: Sequence[Scenario] = ()) -> "Replay":
        """The workload ``config`` measured (its repetitions unless given; ``text``: tg answers it, pp-tg only;
        ``scenarios``: the requests of the scenarios workload)."""
        return cls(workload=config.workload, n_prompt=config.n_prompt, n_gen=config.n_gen, n_depth=config.n_depth,
                   n_parallel=config.n_parallel if config.workload == "server" else 1,
                   repetitions=repetitions or config.repetitions, seed=config.seed,
                   text=text if config.workload == "pp-tg" else "",
                   scenarios=tuple(scenarios) if config.workload == SCENARIOS else ())

    def describe(self) -> str:
        """"pp 512 and tg 128 apart, 5 repetitions each" and the like."""
        depth = f" at depth {self.n_depth}" if self.n_depth else ""
        if self.workload == SCENARIOS:
            what = f"{len(self.scenarios)} requests answered in words"
        elif self.workload == "server":
            what = f"{self.n_parallel} streams of {self.n_prompt} prompt + {self.n_gen} generated tokens"
        elif is_curve(self.workload):
            what = f"a {self.n_prompt}-token prompt{depth}, then {self.n_gen} generated ({self.workload})"
        elif self.text:
            what = f"pp {self.n_prompt} apart{depth}, tg {self.n_gen} answering a {len(self.text):,}-character request"
        else:
            what = f"pp {self.n_prompt} and tg {self.n_gen} apart{depth}"
        return f"{what}, {self.repetitions} repetitions"


@dataclass(frozen=True)
class Vocabulary:
    """Which token ids a prompt may hold: ``n_vocab``, the BOS to start with (None: the model adds none) and the
    normal tokens to draw from."""

    n_vocab: int
    bos: int | None
    normal: tuple[int, ...]

    def prompt(self, rng: random.Random, n: int, *, first: bool = True) -> list[int]:
        """``n`` random normal token ids, BOS first where ``first`` and the model adds one."""
        ids = [self.normal[rng.randrange(len(self.normal))] for _ in range(n)]
        if first and ids and self.bos is not None:
            ids[0] = self.bos
        return ids


def vocabulary(model_path: str) -> Vocabulary:
    """The model's vocabulary as prompts need it, from its GGUF header: ``n_vocab``, BOS where
    ``tokenizer.ggml.add_bos_token`` is on (llama.cpp's default where the key is absent) and the token ids whose
    ``tokenizer.ggml.token_type`` is normal (every id but the special ones named in the header where it has no
    token types).

    Raises:
        UserError: the file is missing or its header is damaged (:func:`read_gguf_header`).
    """
    from llama_tuner.model.info import model_info_from_header

    header = read_gguf_header(model_path)
    info = model_info_from_header(model_path, header)
    md = header.metadata
    bos = md.get("tokenizer.ggml.bos_token_id")
    add_bos = md.get("tokenizer.ggml.add_bos_token", True)
    types = _token_types(header.files[0] if header.files else model_path)
    if types is not None and len(types) == info.n_vocab:
        normal = tuple(i for i, t in enumerate(types) if t == NORMAL_TOKEN)
    else:
        special = {v for k, v in md.items() if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")
                   and isinstance(v, int)}
        normal = tuple(i for i in range(info.n_vocab) if i not in special)
    return Vocabulary(info.n_vocab, int(bos) if add_bos and isinstance(bos, int) else None,
                      normal or tuple(range(info.n_vocab)))


_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar types' bytes
_STRING, _ARRAY = 8, 9


def _token_types(path: str) -> list[int] | None:
    """``tokenizer.ggml.token_type`` of a GGUF file (an int32 per token), None where it has none or cannot be
    read. The header reader keeps only the length of so long an array; this walk reads just that key."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos = 4 + 4 + 8
            (n_kv,) = struct.unpack_from("<Q", buf, pos)
            pos += 8

            def skip(vtype: int, at: int) -> int:
                if vtype == _STRING:
                    return at + 8 + struct.unpack_from("<Q", buf, at)[0]
                if vtype == _ARRAY:
                    item, n = struct.unpack_from("<IQ", buf, at)
                    at += 12
                    if item in _SIZES:
                        return at + _SIZES[item] * n
                    for _ in range(n):
                        at = skip(item, at)
                    return at
                return at + _SIZES[vtype]

            for _ in range(n_kv):
                (klen,) = struct.unpack_from("<Q", buf, pos)
                key = bytes(buf[pos + 8:pos + 8 + klen])
                pos += 8 + klen
                (vtype,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                if key == b"tokenizer.ggml.token_type" and vtype == _ARRAY:
                    item, n = struct.unpack_from("<IQ", buf, pos)
                    if item not in (4, 5):  # uint32, int32
                        return None
                    return list(struct.unpack_from(f"<{n}i", buf, pos + 12))
                pos = skip(vtype, pos)
    except (OSError, ValueError, struct.error, KeyError):
        return None
    return None


@dataclass(kw_only=True)
class ServedRun:
    """One start of llama-server and what it reported: per repetition, the prompt's tokens and milliseconds and
    the generation's decode steps and milliseconds (the server's own ``timings``), its peak memory, and how it
    ended (``status`` ok, start_failed, crash, timeout or error, with the decisive log line as ``reason``)."""

    label: str
    argv: list[str]
    status: str = OK
    reason: str = ""
    exit_code: int | None = None
    signal: str | None = None
    version: str = ""
    load_time_s: float | None = None
    wall_time_s: float | None = None
    pp_n: list[int] = field(default_factory=list)
    pp_ms: list[float] = field(default_factory=list)
    tg_n: list[int] = field(default_factory=list)
    tg_ms: list[float] = field(default_factory=list)
    draft_n: list[int] = field(default_factory=list)  # per tg repetition: tokens drafted (speculative decoding)
    draft_accepted: list[int] = field(default_factory=list)  # and of them accepted
    answers: list[Answer] = field(default_factory=list)  # scenarios: each request's answer, per repetition
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    log_tail: str = ""
    props: dict[str, Any] = field(default_factory=dict)  # /props: slots, each slot's context, build
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)  # what its load log says it allocated

    @property
    def ok(self) -> bool:
        """True when it started and answered every request."""
        return self.status == OK

    @property
    def pp_rates(self) -> list[float]:
        """Prompt t/s of each repetition, as the server computed them (``prompt_per_second``)."""
        return [1e3 * n / ms for n, ms in zip(self.pp_n, self.pp_ms) if ms > 0]

    @property
    def tg_rates(self) -> list[float]:
        """Generation t/s of each repetition (``predicted_per_second``: decode steps over their time)."""
        return [1e3 * n / ms for n, ms in zip(self.tg_n, self.tg_ms) if ms > 0]

    def outcome(self) -> str:
        """"ok", or what went wrong in one line: "did not start: <log line> (exit code 1)"."""
        if self.ok:
            return "ok"
        how = f"exit code {self.exit_code}" if self.exit_code is not None else self.signal or ""
        what = {START_FAILED: "did not start", CRASH: "crashed", TIMEOUT: "stopped answering"}.get(self.status,
                                                                                                "failed")
        return f"{what}: {self.reason}" + (f" ({how})" if how else "")

    def to_result(self, config: BenchConfig, model_path: str, *, interleaved: Interleaved | None = None,
                  n_prompt: int | None = None, n_gen: int | None = None) -> TrialResult:
        """This run as a TrialResult of ``config`` (rates over ``n_prompt`` and ``n_gen`` tokens, each
        repetition's time scaled to them), so that :mod:`llama_tuner.study.comparison` can pair it."""
        n_prompt = n_prompt or max(self.pp_n, default=1)
        n_gen = n_gen or max(self.tg_n, default=1)
        pp = Rates(n_prompt, [int(1e9 * n_prompt / r) for r in self.pp_rates]) if self.pp_rates else None
        tg = Rates(n_gen, [int(1e9 * n_gen / r) for r in self.tg_rates]) if self.tg_rates else None
        # the scenarios' rates are one per request: their repetitions are the passes over the file
        repetitions = len({a.repetition for a in self.answers}) if self.answers else \
            max(1, len(self.tg_rates or self.pp_rates))
        return TrialResult(self.result_status(), replace(config, repetitions=repetitions), model_path,
                           reason=self.reason, exit_code=self.exit_code, signal=self.signal,
                           log_tail=self.log_tail, pp=pp, tg=tg, load_time_s=self.load_time_s,
                           wall_time_s=self.wall_time_s, peak_rss_bytes=self.peak_rss_bytes,
                           peak_vram_bytes=self.peak_vram_bytes, interleaved=interleaved,
                           draft_n=sum(self.draft_n) if self.draft_n else None,
                           draft_accepted=sum(self.draft_accepted) if self.draft_n else None,
                           answers=list(self.answers) or None)

    def result_status(self) -> Status:
        """The TrialResult status of this run: ok; oom where llama.cpp's log says an allocation failed; timeout;
        load_error for a server that did not start for another reason; crash for the rest."""
        if self.ok:
            return Status.OK
        killed = self.status == CRASH and self.signal == "SIGKILL"  # died of a SIGKILL we did not send: the OOM killer
        if OOM_PATTERN.search(self.log_tail) or OOM_PATTERN.search(self.reason) or killed:
            return Status.OOM
        if self.status == TIMEOUT:
            return Status.TIMEOUT
        return Status.LOAD_ERROR if self.status == START_FAILED else Status.CRASH

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServedRun":
        """Rebuild from :meth:`to_dict` output."""
        return cls(**{**d, "answers": [Answer.from_dict(a) for a in d.get("answers") or []]})


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on at ``host`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def decisive_line(log: str) -> str:
    """The log line that says why llama-server stopped: the first line of the strongest kind of error
    (:data:`_DECISIVE`), else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not _HARMLESS.search(ln)]
    for pattern in _DECISIVE:
        line = next((ln for ln in lines if pattern.search(ln)), None)
        if line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


class _Server:
    """A started llama-server: its process, log, port, and a JSON client for it."""

    def __init__(self, argv: list[str], host: str, port: int, env: dict[str, str] | None):
        self.host, self.port = host, port
        self.log = tempfile.TemporaryFile(mode="w+", prefix="llama-tuner-server-")
        # Its own process group (a session on POSIX), so that an interrupt reaches it and nothing else.
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                 else {"start_new_session": True})
        self.proc = subprocess.Popen([*argv, "--host", host, "--port", str(port)], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     **group)

    def text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def died(self) -> bool:
        return self.proc.poll() is not None

    def request(self, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw or b"null")
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def stop(self) -> None:
        """Interrupt it as Ctrl-C would (SIGINT to its group; CTRL_BREAK_EVENT on Windows), then kill it and
        whatever it started (psutil) after :data:`STOP_GRACE_S`."""
        if self.died():
            return
        try:
            if os.name == "nt":
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=STOP_GRACE_S)
        except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError, OSError):
            kill_tree(self.proc.pid)
            self.proc.wait()

    def exit_status(self) -> tuple[int | None, str | None]:
        rc = self.proc.poll()
        if rc is None:
            return None, None
        if rc < 0:
            try:
                return None, signal.Signals(-rc).name
            except ValueError:
                return None, f"signal {-rc}"
        return rc, None


def kill_tree(pid: int) -> None:
    """Kill a process and its descendants (psutil: any platform)."""
    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=STOP_GRACE_S)


def _vm_hwm(pid: int) -> int | None:
    """The peak resident set of a running process, where the system keeps one: VmHWM of /proc on Linux, the
    peak working set on Windows (psutil); None elsewhere (macOS: the sampler's peak is the figure)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:")), None)
    except OSError:
        pass
    try:
        return getattr(psutil.Process(pid).memory_info(), "peak_wset", None)
    except psutil.Error:
        return None


def _chat_prompt(server: _Server, text: str, timeout: float) -> str:
    """``text`` as one user message through the model's chat template, as the server renders it
    (``/apply-template``), ready for ``/completion``.

    Raises:
        ServerStopped: the server died or could not render it.
    """
    try:
        status, answer = server.request("POST", "/apply-template",
                                        {"messages": [{"role": "user", "content": text}]}, timeout)
    except (OSError, http.client.HTTPException) as exc:
        if server.died() or _wait_dead(server):
            raise ServerStopped(CRASH, decisive_line(server.text())) from None
        raise ServerStopped(ERROR, f"/apply-template failed: {exc}") from None
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("prompt"), str):
        raise ServerStopped(ERROR, f"/apply-template answered HTTP {status}: {str(answer)[:200]}")
    return answer["prompt"]


def _completion(server: _Server, prompt: list[int] | str, n_predict: int, *, cache: bool, timeout: float) -> dict:
    """POST /completion and return its ``timings``.

    Raises:
        ServerStopped: the server died, answered with an error, sent no timings, or took longer than ``timeout``.
    """
    body = {"prompt": prompt, "n_predict": n_predict, "cache_prompt": cache, "ignore_eos": True,
            "temperature": 0.0, "top_k": 1, "samplers": ["top_k"], "stream": False}
    try:
        status, answer = server.request("POST", "/completion", body, timeout)
    except socket.timeout:
        raise ServerStopped(TIMEOUT, f"no answer to a {len(prompt)}-token request in {timeout:.0f} s") from None
    except (OSError, http.client.HTTPException) as exc:
        if server.died() or _wait_dead(server):
            raise ServerStopped(CRASH, decisive_line(server.text())) from None
        raise ServerStopped(ERROR, f"the request failed: {exc}") from None
    if status != 200 or not isinstance(answer, dict) or "timings" not in answer:
        message = answer.get("error", {}).get("message", answer) if isinstance(answer, dict) else answer
        raise ServerStopped(ERROR, f"/completion answered HTTP {status}: {str(message)[:200]}")
    return answer["timings"]


GREEDY = {"temperature": 0.0, "top_k": 1, "samplers": ["top_k"]}  # a request's sampling where its line gives none


def answer_scenario(server: _Server, scenario: Scenario, *, repetition: int = 0,
                    timeout: float = REQUEST_TIMEOUT_S) -> Answer:
    """Answer one request for real, streamed, and measure it (:class:`~llama_tuner.measure.scenarios.Answer`): a
    chat through ``/v1/chat/completions`` (the model's template; thinking arrives as ``reasoning_content``), raw
    text through ``/completion``; greedy unless the request says otherwise, no prompt cache (each request as a new
    conversation), until the end of turn or its ``max_tokens``.

    Raises:
        ServerStopped: the server died, answered with an error, sent no timings, or took longer than ``timeout``.
    """
    sampling = scenario.sampling or GREEDY
    if scenario.is_chat:
        path = "/v1/chat/completions"
        body = {"messages": list(scenario.messages), "max_tokens": scenario.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "cache_prompt": False, **sampling}
    else:
        path = "/completion"
        body = {"prompt": scenario.prompt, "n_predict": scenario.max_tokens, "stream": True, "cache_prompt": False,
                **sampling}
    answer = Answer(name=scenario.name, repetition=repetition)
    text, reasoning, timings, usage = [], [], None, None
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raw = resp.read().decode(errors="replace")
            try:
                message = json.loads(raw).get("error", {}).get("message", raw)
            except (ValueError, AttributeError):
                message = raw
            raise ServerStopped(ERROR, f"{path} answered HTTP {resp.status} to {scenario.name}: {str(message)[:200]}")
        for raw_line in resp:
            line = raw_line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            now = time.monotonic() - t0
            if scenario.is_chat:
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    think, say = delta.get("reasoning_content") or "", delta.get("content") or ""
                    if (think or say) and answer.first_token_s is None:
                        answer.first_token_s = now
                    if say and answer.answer_start_s is None:
                        answer.answer_start_s = now
                    reasoning.append(think)
                    text.append(say)
                    if choice.get("finish_reason"):
                        answer.finish = choice["finish_reason"]
                        answer.seconds = now
                usage = chunk.get("usage") or usage
            else:
                say = chunk.get("content") or ""
                if say and answer.first_token_s is None:
                    answer.first_token_s = answer.answer_start_s = now
                text.append(say)
                if chunk.get("stop"):
                    answer.finish = "length" if chunk.get("stop_type") == "limit" else "stop"
                    answer.seconds = now
                    usage = {"prompt_tokens": chunk.get("tokens_evaluated"),
                             "completion_tokens": chunk.get("tokens_predicted")}
            timings = chunk.get("timings") or timings
            if not scenario.is_chat and chunk.get("stop"):
                break
    except socket.timeout:
        raise ServerStopped(TIMEOUT, f"no end to {scenario.name} in {timeout:.0f} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if server.died() or _wait_dead(server):
            raise ServerStopped(CRASH, decisive_line(server.text())) from None
        raise ServerStopped(ERROR, f"{scenario.name}: the stream broke off ({exc})") from None
    finally:
        conn.close()
    if timings is None:
        raise ServerStopped(ERROR, f"{path} sent no timings for {scenario.name}")
    answer.seconds = answer.seconds or time.monotonic() - t0
    answer.text, answer.reasoning = "".join(text), "".join(reasoning)
    answer.capped = answer.finish == "length"
    answer.prompt_tokens = int((usage or {}).get("prompt_tokens") or timings.get("prompt_n") or 0)
    answer.generated_tokens = int((usage or {}).get("completion_tokens") or timings.get("predicted_n") or 0)
    answer.prompt_ms = float(timings.get("prompt_ms") or 0)
    answer.predicted_ms = float(timings.get("predicted_ms") or 0)
    answer.predicted_n = int(timings.get("predicted_n") or answer.generated_tokens)
    answer.draft_n = int(timings.get("draft_n") or 0)
    answer.draft_accepted = int(timings.get("draft_n_accepted") or 0)
    thinking = _tokenize(server, answer.reasoning, timeout) if answer.reasoning else []
    said = _tokenize(server, answer.text, timeout) if answer.text else []
    answer.thinking_tokens = min(len(thinking), answer.generated_tokens) if thinking is not None else 0
    answer.tokens = (thinking or []) + (said or []) if thinking is not None and said is not None else []
    return answer


def _tokenize(server: _Server, text: str, timeout: float) -> list[int] | None:
    """The token ids of ``text`` (``/tokenize``, no special tokens added); None where the server does not answer."""
    try:
        status, answer = server.request("POST", "/tokenize", {"content": text, "add_special": False}, timeout)
    except (OSError, http.client.HTTPException):
        return None
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("tokens"), list):
        return None
    return [t if isinstance(t, int) else int(t.get("id", -1)) for t in answer["tokens"]]


def _wait_dead(server: _Server, seconds: float = 2.0) -> bool:
    try:
        server.proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _wait_healthy(server: _Server, timeout: float) -> None:
    """Wait until /health answers 200 (503 while the model loads).

    Raises:
        ServerStopped: the server exited first (START_FAILED), or did not get ready in ``timeout`` s (TIMEOUT).
    """
    deadline = time.monotonic() + timeout
    while True:
        if server.died():
            raise ServerStopped(START_FAILED, decisive_line(server.text()))
        try:
            status, _ = server.request("GET", "/health", None, 5)
            if status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise ServerStopped(TIMEOUT, f"not ready {timeout:.0f} s after starting ({decisive_line(server.text())})")
        time.sleep(0.1)


def _props(server: _Server) -> dict[str, Any]:
    """What /props says of the server's slots and build ({} where it does not answer)."""
    try:
        status, props = server.request("GET", "/props", None, 10)
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200 or not isinstance(props, dict):
        return {}
    return {"total_slots": props.get("total_slots"), "build_info": props.get("build_info"),
            "slot_n_ctx": (props.get("default_generation_settings") or {}).get("n_ctx")}


def _measure(server: _Server, replay: Replay, vocab: Vocabulary, rng: random.Random, run: ServedRun,
             timeout: float) -> None:
    """Run the replay's tests against ``server``, filling ``run``'s figures."""
    def ask(prompt: list[int], n_predict: int, cache: bool) -> dict:
        return _completion(server, prompt, n_predict, cache=cache, timeout=timeout)

    def with_depth(n: int) -> tuple[list[int], bool]:
        """A prompt of ``n`` ids after ``n_depth`` ids already processed by the server (sent first, cached)."""
        if not replay.n_depth:
            return vocab.prompt(rng, n), False
        prefix = vocab.prompt(rng, replay.n_depth)
        ask(prefix, 0, True)
        return prefix + vocab.prompt(rng, n, first=False), True

    def note_depth(t: dict) -> None:
        if replay.n_depth and t["prompt_n"] != replay.n_prompt:
            note = (f"the server processed {t['prompt_n']} prompt tokens, not the {replay.n_prompt} after the "
                    f"depth: it did not reuse the cached {replay.n_depth} (pp is then over all of them)")
            if note not in run.notes:
                run.notes.append(note)

    ask(vocab.prompt(rng, WARMUP_TOKENS), 2, False)  # warmup, as the child runs one
    request = _chat_prompt(server, replay.text, timeout) if replay.text else None
    for repetition in range(replay.repetitions):
        if replay.workload == SCENARIOS:
            for scenario in replay.scenarios:
                a = answer_scenario(server, scenario, repetition=repetition, timeout=timeout)
                run.answers.append(a)
                run.pp_n.append(a.prompt_tokens)
                run.pp_ms.append(a.prompt_ms)
                if a.predicted_n > 1:
                    run.tg_n.append(a.predicted_n - 1)
                    run.tg_ms.append(a.predicted_ms)
                if a.draft_n:
                    run.draft_n.append(a.draft_n)
                    run.draft_accepted.append(a.draft_accepted)
        elif replay.workload == "server":
            _streams(server, replay, vocab, rng, run, timeout)
        elif is_curve(replay.workload):
            prompt, cache = with_depth(replay.n_prompt)
            t = ask(prompt, replay.n_gen + 1, cache)
            note_depth(t)
            run.pp_n.append(t["prompt_n"])
            run.pp_ms.append(t["prompt_ms"])
            run.tg_n.append(t["predicted_n"] - 1)
            run.tg_ms.append(t["predicted_ms"])
        else:
            if replay.n_prompt:
                prompt, cache = with_depth(replay.n_prompt)
                t = ask(prompt, 1, cache)
                note_depth(t)
                run.pp_n.append(t["prompt_n"])
                run.pp_ms.append(t["prompt_ms"])
            if replay.n_gen:
                t = ask(request or vocab.prompt(rng, max(1, replay.n_depth)), replay.n_gen + 1, False)
                run.tg_n.append(t["predicted_n"] - 1)
                run.tg_ms.append(t["predicted_ms"])
                if "draft_n" in t:  # a speculative server's; llama-server leaves them out where nothing drafted
                    run.draft_n.append(int(t["draft_n"]))
                    run.draft_accepted.append(int(t.get("draft_n_accepted") or 0))


def _streams(server: _Server, replay: Replay, vocab: Vocabulary, rng: random.Random, run: ServedRun,
             timeout: float) -> None:
    """``n_parallel`` requests at once: aggregate pp over the longest prompt time, aggregate tg as the sum of
    the streams' rates."""
    prompts = [vocab.prompt(rng, replay.n_prompt) for _ in range(replay.n_parallel)]
    answers: list[dict | ServerStopped] = [ServerStopped(ERROR, "no answer")] * len(prompts)

    def one(i: int) -> None:
        try:
            answers[i] = _completion(server, prompts[i], replay.n_gen + 1, cache=False, timeout=timeout)
        except ServerStopped as exc:
            answers[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = next((a for a in answers if isinstance(a, ServerStopped)), None)
    if failed is not None:
        raise failed
    run.pp_n.append(sum(a["prompt_n"] for a in answers))
    run.pp_ms.append(max(a["prompt_ms"] for a in answers))
    steps = sum(a["predicted_n"] - 1 for a in answers)
    rate = sum(1e3 * (a["predicted_n"] - 1) / a["predicted_ms"] for a in answers if a["predicted_ms"] > 0)
    run.tg_n.append(steps)
    run.tg_ms.append(1e3 * steps / rate if rate else 0.0)


def serve_and_measure(argv: list[str], replay: Replay, vocab: Vocabulary, *, label: str, seed: int | None = None,
                      version: str = "", host: str = HOST, start_timeout_s: float = START_TIMEOUT_S,
                      request_timeout_s: float = REQUEST_TIMEOUT_S, probe: GpuProbe | None = None,
                      gpu_index: int | None = None, env: dict[str, str] | None = None) -> ServedRun:
    """Start llama-server (``argv``, without host and port: a free loopback port is added), replay ``replay``
    with token ids drawn from ``vocab`` (seeded by ``seed``, else the replay's), sample its memory (RSS, and
    VRAM on ``probe``'s GPU ``gpu_index``), stop it, and return what it reported. Never raises for what the
    server does: a start failure, a crash or a timeout is the run's ``status`` with the decisive log line."""
    [run] = serve_and_measure_each(argv, [replay], vocab, label=label, seed=seed, version=version, host=host,
                                   start_timeout_s=start_timeout_s, request_timeout_s=request_timeout_s,
                                   probe=probe, gpu_index=gpu_index, env=env)
    return run


def serve_and_measure_each(argv: list[str], replays: Sequence[Replay], vocab: Vocabulary, *, label: str,
                           seed: int | None = None, version: str = "", host: str = HOST,
                           start_timeout_s: float = START_TIMEOUT_S, request_timeout_s: float = REQUEST_TIMEOUT_S,
                           probe: GpuProbe | None = None, gpu_index: int | None = None,
                           env: dict[str, str] | None = None) -> list[ServedRun]:
    """:func:`serve_and_measure` of several replays in one start of the server: one ServedRun each, in order.
    A replay's peak memory is the server's peak up to its end; its load time is the server's. Where the server
    fails, that replay has the failure and those after it are not measured (each says so)."""
    probe = probe or NoGpuProbe()
    runs = [ServedRun(label=label, argv=list(argv), version=version) for _ in replays]
    t0 = time.monotonic()
    server, log = None, ""
    for _ in range(3):  # another process may take the free port before llama-server binds it
        vram_before = probe.memory(gpu_index).used if gpu_index is not None else None
        try:
            server = _Server(argv, host, free_port(host), env)
        except OSError as exc:
            for run in runs:
                run.status, run.reason = START_FAILED, f"cannot run {argv[0]}: {exc.strerror or exc}"
            return runs
        sampler = MemorySampler(server.proc.pid, probe=probe, gpu_index=gpu_index, vram_used_before=vram_before,
                                interval=0.05).start()
        failed: ServerStopped | None = None
        rss, vram, done = 0, None, 0
        try:
            _wait_healthy(server, start_timeout_s)
            load_time = time.monotonic() - t0
            props = _props(server)
            for run, replay in zip(runs, replays):
                t_run = time.monotonic()
                run.load_time_s, run.props = load_time, props
                try:
                    _measure(server, replay, vocab, random.Random(replay.seed if seed is None else seed), run,
                             request_timeout_s)
                finally:
                    peaks = sampler.window()
                    rss = max(rss, peaks.rss)
                    vram = max(vram or 0, peaks.vram) if peaks.vram is not None else vram
                    run.peak_rss_bytes, run.peak_vram_bytes = rss or None, vram
                    run.wall_time_s = time.monotonic() - (t0 if done == 0 else t_run)
                done += 1
        except ServerStopped as exc:
            failed = exc
        finally:
            hwm = _vm_hwm(server.proc.pid)
            sampler.stop()
            server.stop()
        log = server.text()
        buffers = buffers_of(log)
        for run in runs:
            run.buffers = buffers
        if failed is not None and failed.status == START_FAILED and _BIND.search(log):
            runs = [ServedRun(label=label, argv=list(argv), version=version) for _ in replays]
            continue
        if hwm:  # the server's lifetime peak, known at its end, counts for the replay that ended it
            last = runs[min(done, len(runs) - 1)]
            last.peak_rss_bytes = max(last.peak_rss_bytes or 0, hwm)
        if failed is not None:
            exit_code, sig = server.exit_status() if failed.status != TIMEOUT else (None, None)
            tail = "\n".join(log.splitlines()[-40:])
            for k, run in enumerate(runs[done:]):
                run.status = failed.status if k == 0 else ERROR
                run.reason = str(failed) if k == 0 else f"not measured: the server {runs[done].outcome()}"
                run.exit_code, run.signal, run.log_tail = exit_code, sig, tail
                run.wall_time_s = run.wall_time_s or time.monotonic() - t0
        break
    return runs


def run_rounds(preset_argv: list[str], defaults_argv: list[str], replay: Replay, vocab: Vocabulary, *,
               rounds: int, measure: Callable[..., ServedRun] = serve_and_measure,
               on_run: Callable[[int, ServedRun], None] | None = None, **options: Any) -> list[dict[str, ServedRun]]:
    """``rounds`` paired rounds of the preset's server beside the defaults' (``measure`` each, ``options`` passed
    on), taking turns at going first: the preset in odd rounds (1, 3, ...), the defaults in even ones, so that a
    machine warming up or slowing down hits both alike. Both get the same token ids in a round (seeded by it).
    Stops after the first round where a server failed; ``on_run`` hears of each run (round from 1)."""
    out: list[dict[str, ServedRun]] = []
    for r in range(1, rounds + 1):
        order = [("preset", preset_argv), ("defaults", defaults_argv)]
        if r % 2 == 0:
            order.reverse()
        runs = {}
        for label, argv in order:
            runs[label] = measure(argv, replay, vocab, label=label, seed=replay.seed * 1000 + r, **options)
            if on_run:
                on_run(r, runs[label])
        out.append(runs)
        if not all(run.ok for run in runs.values()):
            break
    return out
