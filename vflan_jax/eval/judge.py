"""The LLM judge: an OpenAI-compatible chat-completions endpoint, plus a resumable review log.

Config (JSON file given with --judge_config):
    {"base_url": "https://api.openai.com/v1", "model": "gpt-4-0314", "temperature": 0.2,
     "api_key_env": "OPENAI_API_KEY", "max_tokens": 1024, "timeout_s": 120, "max_retries": 5}
Only base_url and model are required; temperature / max_tokens default to each benchmark's
official value. The key is read from the environment variable NAMED in the config and is only
ever placed in the Authorization header: never logged, printed or written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request

from vflan_jax.eval.benchmark import BenchmarkError
from vflan_jax.eval.jsonl import append_jsonl, read_log


class JudgeError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    temperature: float | None = None
    api_key_env: str | None = None
    max_tokens: int | None = None
    timeout_s: float = 120.0
    max_retries: int = 5


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
                raise JudgeError(f"judge: environment variable {config.api_key_env} (named by api_key_env) is not set")

    def __repr__(self) -> str:                       # WHY: keeps the key out of tracebacks and logs
        return f"JudgeClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

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
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                if e.code not in (408, 409, 429) and e.code < 500:
                    break                          # a client error will not fix itself
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                last = f"unexpected response shape ({type(e).__name__})"
            time.sleep(min(2 ** attempt, 30) * 0.5)
        raise JudgeError(f"judge request to {url} failed: {last}")

    def resolve(self, temperature: float, max_tokens: int) -> tuple[float, int]:
        """The config's temperature / max_tokens where given, else the benchmark's official ones."""
        return (self.config.temperature if self.config.temperature is not None else temperature,
                self.config.max_tokens if self.config.max_tokens is not None else max_tokens)


def make_judge(config_path: str | None) -> JudgeClient | None:
    return JudgeClient(load_judge_config(config_path)) if config_path else None


def request_body(model: str, messages: list[dict], temperature: float, max_tokens: int) -> dict:
    return {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}


class ReviewLog:
    """Judge outputs keyed by question, appended as they arrive so an interrupted scoring resumes."""

    def __init__(self, path: str, key_field: str = "key"):
        self.path, self.key_field = path, key_field
        self.records = {r[key_field]: r for r in read_log(path)}

    def __contains__(self, key) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        append_jsonl(self.path, [record])
        self.records[record[self.key_field]] = record


def write_pending_requests(path: str, requests: list[dict]) -> None:
    """Without a judge: the exact request bodies, one per line, for sending later (score re-reads reviews)."""
    if os.path.exists(path):
        os.remove(path)
    append_jsonl(path, requests)
