"""Readers on the real Vision-Flan sample, streaming, bad-record accounting, image paths."""
import json
import os

import pytest

from vflan_jax.data import skips, sources
from vflan_jax.data.skips import BadRecord, SkipCounter


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _key(e):
    return (e.id, e.task_name, e.image, e.turns, e.index)


def test_llava_list_matches_json(vflan_sample_dir):
    path = vflan_sample_dir / "llava_format.json"
    records = _load(path)
    examples = sources.read_examples(path)   # format auto-detected
    assert len(examples) == len(records) == 100
    for e, r in zip(examples, records, strict=True):
        assert (e.id, e.task_name, e.image) == (r["id"], r["task_name"], r["image"])
        assert e.turns == tuple((t["from"], t["value"]) for t in r["conversations"])
        assert e.source == str(path)
    assert [e.index for e in examples] == list(range(100))
    assert len({e.task_name for e in examples}) == 100


def test_jsonl_and_tiny_chunks_read_the_same(vflan_sample_dir, tmp_path, monkeypatch):
    path = vflan_sample_dir / "llava_format.json"
    expected = [_key(e) for e in sources.read_examples(path, format="llava")]
    jsonl = tmp_path / "sample.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n\n" for r in _load(path)), encoding="utf-8")
    assert [_key(e) for e in sources.read_examples(jsonl)] == expected
    # Streaming a JSON list with a buffer far smaller than one record must change nothing.
    monkeypatch.setattr(sources, "_CHUNK", 7)
    assert [_key(e) for e in sources.read_examples(path)] == expected


def test_vflan_raw_format(vflan_sample_dir):
    path = vflan_sample_dir / "raw_format.json"
    records = _load(path)
    examples = sources.read_examples(path)
    assert len(examples) == len(records) == 36
    for e, r in zip(examples, records, strict=True):
        assert e.id == r["instance_id"] and e.image == r["img_path"] and e.task_name == r["task_name"]
        assert e.turns == (("human", "<image>\n" + r["instruction"]), ("gpt", r["output"]))
        # §2.2: the instruction already holds input_text and the options block, so nothing is added twice.
        if r["input_text"]:
            assert r["input_text"] in r["instruction"]
        if r["options"]:
            assert "\nOptions: (a) " + r["options"][0] in r["instruction"]


def test_website_nested_data_format(vflan_sample_dir, tmp_path):
    records = _load(vflan_sample_dir / "raw_format.json")
    nested = tmp_path / "data.json"
    nested.write_text(json.dumps({"data": [records[:12], records[12:24], records[24:]]}, indent=2))
    assert [e.id for e in sources.read_examples(nested, format="vflan_raw")] == [r["instance_id"] for r in records]


def test_format_errors_name_the_file(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match="odd.json.*cannot detect"):
        sources.read_examples(path)
    with pytest.raises(ValueError, match="unknown format"):
        sources.read_examples(path, format="csv")


def test_task_name_default_or_error(tmp_path):
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps([{"id": 7, "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}]))
    with pytest.raises(ValueError, match=r"instruct\.json.*'7'.*task_name"):
        sources.read_examples(path)
    (e,) = sources.read_examples(path, default_task="llava_instruct")
    assert (e.id, e.task_name) == ("7", "llava_instruct")


def _conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


BAD = {   # record -> expected reason
    "no_conversations": ({"image": "a.png"}, skips.MALFORMED),
    "wrong_role": ({"image": "a.png", "conversations": _conv(("human", "<image>\nq"), ("bot", "a"))},
                   skips.MALFORMED),
    "not_alternating": ({"image": "a.png", "conversations": _conv(("human", "<image>\nq"), ("human", "q"),
                                                                 ("gpt", "a"), ("gpt", "b"))}, skips.MALFORMED),
    "odd_turns": ({"image": "a.png", "conversations": _conv(("human", "<image>\nq"), ("gpt", "a"),
                                                           ("human", "more?"))}, skips.MALFORMED),
    "non_string": ({"image": "a.png", "conversations": _conv(("human", "<image>\nq"), ("gpt", 5))},
                   skips.MALFORMED),
    "image_in_answer": ({"image": "a.png", "conversations": _conv(("human", "<image>\nq"), ("gpt", "<image>"))},
                        skips.MALFORMED),
    "no_placeholder": ({"image": "a.png", "conversations": _conv(("human", "q"), ("gpt", "a"))}, skips.MALFORMED),
    "placeholder_no_image": ({"conversations": _conv(("human", "<image>\nq"), ("gpt", "a"))}, skips.MALFORMED),
    "two_images": ({"image": ["a.png", "b.png"], "conversations": _conv(("human", "<image>\nq"), ("gpt", "a"))},
                   skips.MALFORMED),
    "empty_answer": ({"image": "a.png", "conversations": _conv(("human", "<image>\nq"), ("gpt", "  \n"))},
                     skips.EMPTY_ANSWER),
}


def _write_bad_file(tmp_path):
    good = {"id": "good", "task_name": "T", "image": "a.png",
            "conversations": _conv(("gpt", "dropped leading answer"), ("human", "q <image>"), ("gpt", "a"))}
    lines = [json.dumps(good)]
    for name, (record, _) in BAD.items():
        lines.append(json.dumps({"id": name, "task_name": "T" if name != "empty_answer" else "U", **record}))
    lines.append('{"id": "broken", "conversations": [')   # unparsable JSONL line
    lines.append(json.dumps(["not", "an", "object"]))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_record_kind_is_counted(tmp_path):
    path = _write_bad_file(tmp_path)
    counter = SkipCounter()
    (good,) = sources.read_examples(path, on_bad=counter)
    assert good.id == "good" and good.turns == (("human", "q <image>"), ("gpt", "a"))   # leading gpt dropped
    malformed = sum(1 for _, reason in BAD.values() if reason == skips.MALFORMED) + 2   # + broken line + list
    assert counter.by_reason == {skips.MALFORMED: malformed, skips.EMPTY_ANSWER: 1}
    assert counter.by_task[("U", skips.EMPTY_ANSWER)] == 1
    assert counter.by_task[("T", skips.MALFORMED)] == malformed - 2
    assert counter.total == malformed + 1


@pytest.mark.parametrize("name", list(BAD))
def test_strict_mode_names_file_id_and_reason(tmp_path, name):
    record, reason = BAD[name]
    path = tmp_path / "strict.json"
    path.write_text(json.dumps([{"id": f"rec-{name}", "task_name": "T", **record}]))
    with pytest.raises(BadRecord) as info:
        sources.read_examples(path, format="llava")   # on_bad defaults to "raise"
    assert info.value.reason == reason
    message = str(info.value)
    assert "strict.json" in message and f"rec-{name}" in message and reason in message


def test_broken_jsonl_line_is_one_malformed_record(tmp_path):
    path = tmp_path / "x.jsonl"
    ok = {"id": "a", "task_name": "T", "image": "a.png", "conversations": _conv(("human", "<image>"), ("gpt", "b"))}
    path.write_text(json.dumps(ok) + "\n{oops\n" + json.dumps(ok) + "\n")
    counter = SkipCounter()
    assert len(sources.read_examples(path, on_bad=counter)) == 2
    assert counter.by_reason == {skips.MALFORMED: 1} and "line 2" in counter.first_message[skips.MALFORMED]
    with pytest.raises(BadRecord, match=r"x\.jsonl, record 'line 2'.*malformed_conversation"):
        sources.read_examples(path)


def test_invalid_json_list_raises_with_file(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"id": "a", "conversations": []}, {"id": ')
    with pytest.raises(ValueError, match="cut.json"):
        sources.read_examples(path, format="llava", on_bad=SkipCounter())


def test_resolve_image_path(vflan_sample_dir, tmp_path):
    folder = vflan_sample_dir / "images"
    name = sorted(os.listdir(folder))[0]
    assert sources.resolve_image_path(folder, name) == os.path.realpath(folder / name)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", tmp_path / "imgs" / "link.png")
    assert sources.resolve_image_path(tmp_path / "imgs", "sub/../ok (1).v2.png").endswith("ok (1).v2.png")
    for bad in ["../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "/etc/passwd",
                "link.png", "", "."]:
        with pytest.raises(BadRecord) as info:
            sources.resolve_image_path(tmp_path / "imgs", bad)
        assert info.value.reason == skips.PATH_ESCAPE, bad


def test_skip_counter_roundtrip_and_report():
    a, b = SkipCounter(), SkipCounter()
    for reason in skips.REASONS:
        a.add(BadRecord(reason, "why", record_id="r1", source="f.json", task_name="T1"))
    b.add(skips.TOO_LONG, task_name="T2", count=3)
    a.merge(b)
    d = a.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["total"] == len(skips.REASONS) + 3 and d["by_reason"][skips.TOO_LONG] == 4
    assert d["by_task"]["T2"] == {skips.TOO_LONG: 3}
    assert SkipCounter.from_dict(d).as_dict() == d
    report = a.report()
    assert all(reason in report for reason in skips.REASONS) and "f.json" in report
    with pytest.raises(ValueError):
        a.add("not_a_reason")
    with pytest.raises(TypeError):
        skips.skip_or_raise(BadRecord(skips.TOO_LONG), on_bad="ignore")


# ----------------------------------------------------------------------------- byte offsets, non-UTF-8 bytes

def _rec(rid, answer="b"):
    return {"id": rid, "task_name": "T", "image": "a.png",
            "conversations": _conv(("human", "<image> é"), ("gpt", answer))}


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_spans_reread_each_record_exactly(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    recs = [_rec(f"r{i}", answer="ü€𝄞" * i + "x") for i in range(6)]
    for name, text in (("l.json", "[\n" + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n]"),
                       ("l.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))):
        path = tmp_path / name
        raw = text.encode("utf-8")
        path.write_bytes(raw)
        spans = list(sources.iter_json_spans(str(path)))
        assert [r for r, _, _ in spans] == recs
        assert [json.loads(raw[o:o + n]) for _, o, n in spans] == recs


def test_non_utf8_byte_in_a_jsonl_line_is_one_counted_skip(tmp_path):
    good = (json.dumps(_rec("a"), ensure_ascii=False) + "\n").encode()
    bad = b'{"id": "x", "task_name": "T\xff"}\n'
    path = tmp_path / "x.jsonl"
    path.write_bytes(good + bad + good)
    counter = SkipCounter()
    assert len(sources.read_examples(path, on_bad=counter)) == 2
    assert counter.by_reason == {skips.MALFORMED: 1}
    message = counter.first_message[skips.MALFORMED]
    at = len(good) + bad.index(b"\xff")
    assert "line 2" in message and f"not UTF-8 at byte offset {at}" in message


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_json_list_that_cannot_be_decoded_names_file_and_byte_offset(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    head = ("[" + json.dumps(_rec("a", answer="€" * 5), ensure_ascii=False) + ", ").encode()
    path = tmp_path / "bad_byte.json"
    path.write_bytes(head + b'{"id": "b\xff"}]')
    with pytest.raises(ValueError, match=rf"bad_byte\.json: not UTF-8 at byte offset {len(head) + 9}\b"):
        sources.read_examples(path, on_bad=SkipCounter())
    path = tmp_path / "bad_json.json"
    path.write_bytes(head + b'{"id": "b", oops}]')
    with pytest.raises(ValueError, match=rf"bad_json\.json: invalid JSON at byte offset {len(head) + 12}\b"):
        sources.read_examples(path, on_bad=SkipCounter())
