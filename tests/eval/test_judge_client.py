"""The judge client against a fake loopback server: an echoed API key is redacted from every
message, no sleep follows the last failed attempt, Retry-After is honoured (issue 11 items 9, 11)."""
import email.utils
import time

import pytest

from tests.eval.fake_judge import HTTPReply, fake_judge, write_config
from vflan_jax.eval import judge as judge_module
from vflan_jax.eval.__main__ import main
from vflan_jax.eval.judge import JudgeError, make_judge

SECRET = "sk-test-ECHOED-7f3a9"
KEY_ENV = "VFLAN_TEST_JUDGE_KEY"


def _echo_authorization(body, headers):
    """A server that puts the request's Authorization header in its error body (as some proxies do)."""
    return HTTPReply(401, f'{{"error": "invalid key", "received": "{headers["Authorization"]}"}}')


@pytest.fixture
def sleeps(monkeypatch):
    recorded = []
    monkeypatch.setattr(judge_module.time, "sleep", recorded.append)
    return recorded


def test_echoed_key_is_redacted_from_the_error(tmp_path, monkeypatch, sleeps):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with fake_judge(_echo_authorization) as server:
        client = make_judge(write_config(tmp_path / "j.json", server.base_url, api_key_env=KEY_ENV))
        with pytest.raises(JudgeError) as err:
            client.chat([{"role": "user", "content": "hi"}], 0.0, 3)
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"     # the key was sent...
    message = str(err.value)
    assert "HTTP 401" in message and "invalid key" in message and "Bearer <redacted>" in message  # body verbatim
    assert SECRET not in message and SECRET[:8] not in message.replace("sk-test-", "")   # ...and never shown
    assert len(server.requests) == 1 and sleeps == []        # a 401 is not retried, nothing slept


def test_cli_prints_no_key_when_the_judge_echoes_it(tmp_path, monkeypatch, capsys, sleeps):
    from tests.eval.test_judged import _write_llava_bench
    monkeypatch.setenv(KEY_ENV, SECRET)
    answers = _write_llava_bench(tmp_path / "data")
    predictions = tmp_path / "answers.jsonl"
    predictions.write_text("".join(__import__("json").dumps(a) + "\n" for a in answers))
    with fake_judge(_echo_authorization) as server:
        config = write_config(tmp_path / "j.json", server.base_url, api_key_env=KEY_ENV)
        rc = main(["score", "--benchmark", "llava_bench", "--predictions", str(predictions), "--annotations",
                   str(tmp_path / "data"), "--judge_config", config, "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    # the rest is the progress bar
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "invalid key" in errors[0]
    assert SECRET not in captured.err + captured.out


def test_no_sleep_after_the_last_attempt(tmp_path, sleeps):
    with fake_judge(lambda body: HTTPReply(503, "overloaded")) as server:
        client = make_judge(write_config(tmp_path / "j.json", server.base_url, max_retries=3))
        with pytest.raises(JudgeError, match="4 attempt"):
            client.chat([{"role": "user", "content": "hi"}], 0.0, 3)
    assert len(server.requests) == 4
    assert sleeps == [judge_module.backoff_s(a) for a in range(3)]     # 3 waits between 4 attempts, none after


def test_retry_after_is_honoured(tmp_path, sleeps):
    replies = iter([HTTPReply(429, "slow down", {"Retry-After": "7"}),
                    HTTPReply(503, "busy", {"Retry-After": email.utils.formatdate(time.time() + 40, usegmt=True)}),
                    "8 6\nfine"])
    with fake_judge(lambda body: next(replies)) as server:
        client = make_judge(write_config(tmp_path / "j.json", server.base_url, max_retries=5))
        assert client.chat([{"role": "user", "content": "hi"}], 0.0, 3) == "8 6\nfine"
    assert len(server.requests) == 3 and sleeps[0] == 7.0
    assert 30 < sleeps[1] <= 40                      # an HTTP date: the seconds until then


def test_retry_after_is_capped(tmp_path, sleeps):
    replies = iter([HTTPReply(429, "come back tomorrow", {"Retry-After": "86400"}), "ok"])
    with fake_judge(lambda body: next(replies)) as server:
        client = make_judge(write_config(tmp_path / "j.json", server.base_url, max_wait_s=60))
        assert client.chat([{"role": "user", "content": "hi"}], 0.0, 3) == "ok"
    assert sleeps == [60]


def test_retry_after_parsing():
    assert judge_module.retry_after_s("2.5", 1.0) == 2.5
    assert judge_module.retry_after_s(None, 1.0) == 1.0 and judge_module.retry_after_s("soon", 1.0) == 1.0
    assert judge_module.retry_after_s(email.utils.formatdate(time.time() - 60, usegmt=True), 1.0) == 0.0
