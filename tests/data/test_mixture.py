"""Mixture selection: caps, fixed budgets, subsets, held-out tasks -- exact counts, seeded,
independent of file order."""
import json
import random

import pytest

from vflan_jax.data import mixture
from vflan_jax.data.mixture import SourceSpec

# task -> number of records
SIZES = {"A+t1": 30, "B+t2": 12, "C+t3": 5, "D+t4": 50, "E+t5": 20}


def records():
    out = []
    for task, n in SIZES.items():
        for i in range(n):
            out.append({"id": f"{task}-{i}", "image": f"{task}/{i}.jpg", "task_name": task,
                        "conversations": [{"from": "human", "value": f"<image>\nq{i}"},
                                          {"from": "gpt", "value": f"a{i}"}]})
    return out


def write(path, recs):
    path.write_text(json.dumps(recs))
    return str(path)


@pytest.fixture
def data_file(tmp_path):
    return write(tmp_path / "d.json", records())


def spec(path, **kw):
    paths = (path,) if isinstance(path, str) else tuple(path)
    return SourceSpec(name=kw.pop("name", "vf"), paths=paths, image_folder=".", **kw)


def ids(m):
    return sorted(e.id for s in m.sources for e in s.examples)


def test_no_selection_takes_everything(data_file):
    m = mixture.build_mixture([spec(data_file)], log=False)
    assert m.counts()["vf"]["A+t1"] == {"available": 30, "selected": 30}
    assert len(ids(m)) == sum(SIZES.values())
    assert m.task_names == sorted(SIZES)


def test_per_task_cap_exact(data_file):
    m = mixture.build_mixture([spec(data_file, max_per_task=10)], seed=3, log=False)
    sel = {t: c["selected"] for t, c in m.counts()["vf"].items()}
    assert sel == {"A+t1": 10, "B+t2": 10, "C+t3": 5, "D+t4": 10, "E+t5": 10}
    again = mixture.build_mixture([spec(data_file, max_per_task=10)], seed=3, log=False)
    other = mixture.build_mixture([spec(data_file, max_per_task=10)], seed=4, log=False)
    assert ids(m) == ids(again) and ids(m) != ids(other)


def test_selection_independent_of_file_order_and_splitting(tmp_path):
    recs = records()
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    a = mixture.build_mixture([spec(write(tmp_path / "a.json", recs), max_per_task=7, subset=20)], seed=1, log=False)
    b = mixture.build_mixture([spec([write(tmp_path / "b1.json", shuffled[:40]),
                                     write(tmp_path / "b2.json", shuffled[40:])], max_per_task=7, subset=20)],
                              seed=1, log=False)
    assert ids(a) == ids(b)
    # the training order (before the pipeline's shuffle) does not depend on file order either
    assert [e.id for e in a.sources[0].examples] == [e.id for e in b.sources[0].examples]


def test_fixed_budget_T_by_N_exact(data_file):
    m = mixture.build_mixture([spec(data_file, budget_tasks=2, budget_per_task=20)], seed=0, log=False)
    sel = {t: c["selected"] for t, c in m.counts()["vf"].items() if c["selected"]}
    assert len(sel) == 2 and set(sel.values()) == {20}
    assert set(sel) <= {"A+t1", "D+t4", "E+t5"}            # only tasks with >= 20 examples qualify
    chosen = [frozenset(t for t, c in mixture.build_mixture(
        [spec(data_file, budget_tasks=2, budget_per_task=20)], seed=s, log=False).counts()["vf"].items()
        if c["selected"]) for s in range(12)]
    assert len(set(chosen)) > 1                            # the seed picks the tasks
    every = mixture.build_mixture([spec(data_file, budget_per_task=12)], log=False)
    assert {t: c["selected"] for t, c in every.counts()["vf"].items()} == {
        "A+t1": 12, "B+t2": 12, "C+t3": 0, "D+t4": 12, "E+t5": 12}
    with pytest.raises(ValueError, match="budget_tasks=4"):
        mixture.build_mixture([spec(data_file, budget_tasks=4, budget_per_task=20)], log=False)


def test_seeded_subset(data_file):
    m = mixture.build_mixture([spec(data_file, subset=25)], seed=5, log=False)
    assert len(ids(m)) == 25 and sum(c["selected"] for c in m.counts()["vf"].values()) == 25
    assert ids(m) == ids(mixture.build_mixture([spec(data_file, subset=25)], seed=5, log=False))
    assert ids(m) != ids(mixture.build_mixture([spec(data_file, subset=25)], seed=6, log=False))
    with pytest.raises(ValueError, match="subset=1000"):
        mixture.build_mixture([spec(data_file, subset=1000)], log=False)


def test_heldout_tasks_excluded_and_kept_for_eval(data_file):
    m = mixture.build_mixture([spec(data_file, max_per_task=10)], heldout_tasks=["B+t2", "E+t5"], log=False)
    assert "B+t2" not in m.task_names and "E+t5" not in m.task_names
    assert not any(e.task_name in ("B+t2", "E+t5") for e in m.sources[0].examples)
    assert sorted(e.task_name for e in m.heldout_examples) == ["B+t2"] * 12 + ["E+t5"] * 20
    assert m.counts()["vf"]["B+t2"] == {"available": 12, "selected": 0}


def test_two_sources_table_and_bad_records(tmp_path, data_file):
    chat = [{"id": f"c{i}", "image": f"{i}.jpg",
             "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": f"x{i}"}]}
            for i in range(8)]
    chat.append({"id": "broken", "conversations": [{"from": "gpt", "value": "x"}]})
    chat_file = write(tmp_path / "chat.json", chat)
    m = mixture.build_mixture([spec(data_file, max_per_task=2),
                               spec(chat_file, name="llava", default_task="llava_instruct", subset=3)], log=False)
    assert m.counts()["llava"] == {"llava_instruct": {"available": 8, "selected": 3}}
    assert m.skipped.by_reason == {"malformed_conversation": 1}
    table = m.table()
    assert "llava_instruct" in table and "A+t1" in table and "malformed" in table
    with pytest.raises(Exception, match="broken"):
        mixture.build_mixture([spec(chat_file, default_task="x")], strict=True, log=False)
