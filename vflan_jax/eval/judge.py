"""The LLM judge: an OpenAI-compatible chat-completions endpoint, plus a resumable review log.

Config (JSON file given with --judge_config):
    {"base_url": "https://api.openai.com/v1", "model": "gpt-4-0314", "temperature": 0.2,
     "api_key_env": "OPENAI_API_KEY", "max_tokens": 1024, "timeout_s": 120, "max_retries": 5,
     "max_wait_s": 300}
Only base_url and model are required; temperature / max_tokens default to each benchmark's
official value. The key is read from the environment variable NAMED in the config and is only
ever placed in the Authorization header: every message this module makes has it redacted (a
server may echo the header in its error body).

Reviews are cached in a log per output folder, keyed by a hash of everything that decides the
review: the question, the answer text, the judge (base_url, model, temperature, max_tokens) and
the exact messages sent. Another model's answers, or another judge, never reuse a review.
"""
from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from vflan_jax.eval.benchmark import BenchmarkError
from vflan_jax.eval.jsonl import append_jsonl, read_log, write_jsonl


class JudgeError(RuntimeError):
    """The judge could not be reached or kept failing (exit 1); bad judge configuration is a BenchmarkError."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    temperature: float | None = None
    api_key_env: str | None = None
    max_tokens: int | None = None
    timeout_s: float = 120.0
    max_retries: int = 5
    max_wait_s: float = 300.0         # the longest wait between attempts, whatever Retry-After asks


def load_judge_config(path: str) -> JudgeConfig:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"judge config {path}: expected a JSON file with base_url, model "
                             f"[, temperature, api_key_env, max_tokens]: {e}") from None
    fields = {f.name for f in dataclasses.fields(JudgeConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown or not {"base_url", "model"} <= set(raw):
        raise BenchmarkError(f"judge config {path}: needs base_url and model; allowed keys {sorted(fields)}; "
                             f"unknown {unknown}")
    return JudgeConfig(**raw)


class JudgeClient:
    """POST {base_url}/chat/completions; returns the first choice's message content."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self._api_key = None
        if config.api_key_env:
            self._api_key = os.environ.get(config.api_key_env)
            if not self._api_key:
                raise BenchmarkError(f"judge: environment variable {config.api_key_env} (named by api_key_env) "
                                     "is not set")

    def __repr__(self) -> str:                       # WHY: keeps the key out of tracebacks and logs
        return f"JudgeClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

    def redact(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def chat(self, messages: list[dict], temperature: float, max_tokens: int) -> str:
        """temperature / max_tokens as sent; get them from resolve() to honour the config."""
        body = request_body(self.config.model, messages, temperature, max_tokens)
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        last = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
            wait = backoff_s(attempt)
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                # WHY redact before cutting: a key cut in half would escape the replacement.
                last = self.redact(f"HTTP {e.code}: {e.read()[:4000].decode(errors='replace')}")[:500]
                if e.code not in (408, 409, 429) and e.code < 500:
                    break                          # a client error will not fix itself
                wait = min(retry_after_s(e.headers.get("Retry-After") if e.headers else None, wait),
                           self.config.max_wait_s)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = self.redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                last = f"unexpected response shape ({type(e).__name__})"
            if attempt < self.config.max_retries:  # WHY: no point waiting after the last attempt
                time.sleep(wait)
        raise JudgeError(self.redact(f"judge request to {url} failed after {attempt + 1} attempt(s): {last}"))

    def resolve(self, temperature: float, max_tokens: int) -> tuple[float, int]:
        """The config's temperature / max_tokens where given, else the benchmark's official ones."""
        return (self.config.temperature if self.config.temperature is not None else temperature,
                self.config.max_tokens if self.config.max_tokens is not None else max_tokens)


def backoff_s(attempt: int) -> float:
    return min(2 ** attempt, 30) * 0.5


def retry_after_s(header: str | None, default: float) -> float:
    """Retry-After as seconds or an HTTP date (RFC 9110 10.2.3); the default when absent or unreadable."""
    if not header:
        return default
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


def make_judge(config_path: str | None) -> JudgeClient | None:
    return JudgeClient(load_judge_config(config_path)) if config_path else None


def request_body(model: str, messages: list[dict], temperature: float, max_tokens: int) -> dict:
    return {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}


def review_key(judge: JudgeClient, question_key, answer: str, messages: list[dict], temperature: float,
               max_tokens: int) -> str:
    """What a stored review may be reused for: this question, this answer text, this judge and prompt."""
    identity = {"question": str(question_key), "answer": answer, "base_url": judge.config.base_url.rstrip("/"),
                "model": judge.config.model, "temperature": temperature, "max_tokens": max_tokens,
                "messages": messages}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ReviewLog:
    """Judge outputs keyed by review_key(), appended as they arrive so an interrupted scoring resumes.
    Records written before keys were hashed (no "cache_key") are never reused."""

    def __init__(self, path: str):
        self.path = path
        self.records = {r["cache_key"]: r for r in read_log(path) if "cache_key" in r}
        self.reused, self.requested = 0, 0

    def review_all(self, items: list[tuple[str, Any]], review_fn: Callable[[Any], dict], desc: str) -> list[dict]:
        """items: (review_key, request). Reviews what is not cached with review_fn(request) -> record
        fields, appending each as it arrives; returns the record of every item, in order."""
        from tqdm import tqdm
        todo = list({k: r for k, r in items if k not in self.records}.items())
        for key, request in tqdm(todo, desc=desc, unit="q"):
            record = {"cache_key": key, **review_fn(request)}
            append_jsonl(self.path, [record])
            self.records[key] = record
        self.requested += len(todo)
        self.reused += len(items) - len(todo)
        return [self.records[k] for k, _ in items]

    def counts(self) -> dict:
        return {"reviews_requested": self.requested, "reviews_reused": self.reused, "cache": self.path}

    def note(self) -> str:
        return (f"judge: {self.requested} reviews requested, {self.reused} reused from {self.path} "
                "(same question, answer, judge and prompt)")


def write_pending_requests(path: str, requests: list[dict]) -> None:
    """Without a judge: the exact request bodies, one per line, for sending later (score re-reads reviews)."""
    write_jsonl(path, requests)
