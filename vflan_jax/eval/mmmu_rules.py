"""MMMU's answer parsing and scoring, rule for rule as MMMU's mmmu/utils/eval_utils.py and the
subject tables of mmmu/utils/data_utils.py (github MMMU-Benchmark/MMMU; docs/EVALUATION.md).

Kept separate from the benchmark module so it can be compared line by line with the original.
The one change: the random fallback draws from a random.Random passed in (seeded 42 by the
caller, in MMMU's subject order) instead of the module-global generator MMMU seeds on import;
random.Random(42).choice draws the same sequence.
"""
from __future__ import annotations

import random
import re

DOMAIN_CAT2SUB_CAT = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
# The order main_parse_and_eval.py --subject ALL walks (CAT_SHORT2LONG's), which orders the random draws.
SUBJECTS = ("Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
            "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design",
            "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power", "Finance",
            "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math",
            "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology", "Public_Health", "Sociology")
SEED = 42


def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict[str, str],
                                rng: random.Random) -> tuple[str, bool]:
    """(predicted letter, whether it was drawn at random because nothing in the response named one)."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "                    # MMMU: spaces avoid partial matches
    index_ans, ans_with_brack, candidates = True, False, []
    for choice in all_choices:                         # (A) (B) ...
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        for choice in all_choices:                     # A B ...
            if f" {choice} " in response:
                candidates.append(choice)
    if not candidates and len(response.split()) > 5:   # the option's text, in a long enough response
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return rng.choice(all_choices), True
    if len(candidates) == 1:
        return candidates[0], False
    if index_ans:
        pattern = "({})" if ans_with_brack else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))], False    # the last one named (np.argmax: first of ties)


def check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list:
    """A number -> [float rounded to 2 decimals]; a string -> lower case (one character padded)."""
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def extract_numbers(string: str) -> list[str]:
    pattern_commas = r"-?\b\d{1,3}(?:,\d{3})+\b"
    pattern_scientific = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
    pattern_simple = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"
    return re.findall(pattern_commas, string) + re.findall(pattern_scientific, string) + re.findall(
        pattern_simple, string)


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    key_responses = []
    for index, resp in enumerate(sub_responses):
        if index == len(sub_responses) - 1:
            indicators.extend(["="])                   # MMMU extends the shared list (it stays extended)
        shortest = None
        for indicator in indicators:
            if indicator in resp:
                tail = resp.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            key_responses.append(shortest)
    return key_responses or [response]


def parse_open_response(response: str) -> list:
    key_responses = _key_subresponses(response)
    pred_list = key_responses.copy()
    for resp in key_responses:
        pred_list.extend(extract_numbers(resp))
    normalized = []
    for pred in pred_list:
        normalized.extend(normalize_str(pred))
    return list(set(normalized))


def eval_multi_choice(gold, pred: str) -> bool:
    return pred in gold if isinstance(gold, list) else gold == pred


def eval_open(gold, pred_list: list) -> bool:
    if isinstance(gold, list):
        norm_answers = [n for answer in gold for n in normalize_str(answer)]
    else:
        norm_answers = normalize_str(gold)
    for pred in pred_list:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in norm_answers):
                return True
        elif pred in norm_answers:
            return True
    return False


def calculate_ins_level_acc(results: dict) -> float:
    """Accuracy over the instances of several subjects: their accuracies weighted by num_example."""
    n = sum(r["num_example"] for r in results.values())
    return sum(r["acc"] * r["num_example"] for r in results.values()) / n if n else 0
