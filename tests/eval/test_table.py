"""`python -m vflan_jax.eval table`: one row per checkpoint, the paper's Table 2 columns plus POPE's
yes-ratio; missing and pending cells say so, never 0 (issue 14)."""
import json
import os

from vflan_jax.eval.__main__ import main
from vflan_jax.eval.benchmark import Result
from vflan_jax.eval.report import write_report


def _report(root, folder, benchmark, headline, metrics=None, **context):
    result = Result(benchmark, "h", headline, metrics or {}, {})
    return write_report(result, str(root / folder), context)["json"]


def test_table_rows_columns_and_missing_cells(tmp_path, capsys):
    paths = [
        _report(tmp_path, "base-mme", "mme", 1537.84, checkpoint="/ckpt/vflan-base", model_id="vflan-base"),
        _report(tmp_path, "base-pope", "pope", 85.93, {"yes_ratio_avg": 47.26}, model_id="vflan-base"),
        _report(tmp_path, "chat-mme", "mme", 1490.61, model_id="vflan-chat"),
        _report(tmp_path, "chat-llava", "llava_bench", None, model_id="vflan-chat"),          # judge pending
        _report(tmp_path, "chat-mmmu", "mmmu", 0.0, model_id="vflan-chat"),                    # a real 0
        _report(tmp_path, "scored", "mm_vet", 36.14, predictions="/answers/llava-v1.5-13b.jsonl"),
    ]
    out = tmp_path / "table" / "table.md"
    assert main(["table", *paths, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert printed == out.read_text()
    assert lines[0] == ("| checkpoint | MM-Bench | MME | LLaVA-Bench | POPE | POPE yes-ratio | MM-Vet | MMMU | CF |")
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert rows["vflan-base"] == ["missing", "1537.8", "missing", "85.9", "47.3", "missing", "missing", "missing"]
    assert rows["vflan-chat"] == ["missing", "1490.6", "pending", "missing", "missing", "missing", "0.0", "missing"]
    assert rows["llava-v1.5-13b"][5] == "36.1" and len(rows) == 3
    assert os.path.getsize(tmp_path / "table" / "table.png") > 0


def test_duplicate_or_foreign_reports_are_bad_input(tmp_path, capsys):
    a = _report(tmp_path, "a", "pope", 80.0, model_id="m")
    b = _report(tmp_path, "b", "pope", 81.0, model_id="m")
    assert main(["table", a, b]) == 2
    assert "two pope reports for m" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"loss": 1.0}))
    assert main(["table", str(other)]) == 2
    assert "not a report.json" in capsys.readouterr().err
