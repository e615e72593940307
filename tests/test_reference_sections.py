"""Every section the code cites (`docs/REFERENCE.md §N`, ranges and `a/b` pairs
included) exists in docs/REFERENCE.md; the task counts the docs quote are synthetic.py's."""
import pathlib
import re

from vflan_jax.data.synthetic import HELDOUT_TASKS, TASKS, TRAIN_TASKS

REPO = pathlib.Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(?:recipe(?:\.md)?|REFERENCE\.md) (§[\d.,\-/ §]*\d)")


def reference_sections() -> set[str]:
    text = (REPO / "docs" / "REFERENCE.md").read_text()
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE)
    items = re.findall(r"^- \*\*(\d+\.\d+)\*\* ", text, re.MULTILINE)  # §7's open questions
    return set(headings) | set(items)


def cited_sections() -> dict[str, str]:
    cited = {}
    files = [p for folder in ("vflan_jax", "configs", "benchmarks", "tests", "launch")
             for p in (REPO / folder).rglob("*.py")] + [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    for path in files:
        for group in CITATION.findall(path.read_text()):
            for number in re.findall(r"\d+(?:\.\d+)?", group):
                cited.setdefault(number, str(path.relative_to(REPO)))
    return cited


def test_every_cited_section_exists():
    cited, sections = cited_sections(), reference_sections()
    assert len(cited) > 20  # the pattern finds the code's citations at all
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert not missing, f"cited but not in docs/REFERENCE.md: {missing}"


def test_docs_quote_the_task_suite_counts():
    total, trained, held_out = len(TASKS), len(TRAIN_TASKS), len(HELDOUT_TASKS)
    assert total == trained + held_out
    readme = (REPO / "README.md").read_text()
    demo = (REPO / "configs" / "demo.py").read_text()
    notebook = (REPO / "notebooks" / "quickstart.ipynb").read_text()
    for name, text in (("README.md", readme), ("configs/demo.py", demo), ("quickstart.ipynb", notebook)):
        counts = {int(n) for n in re.findall(r"(\d+) (?:training )?task types", text)}
        assert counts == {total}, f"{name} says {counts} task types; synthetic.py has {total}"
    for name, text in (("configs/demo.py", demo), ("quickstart.ipynb", notebook)):
        assert f"{trained} trained" in text and f"{held_out} held out" in text, name
