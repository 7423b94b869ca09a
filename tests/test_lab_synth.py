"""The rule-based synthetic preference sets: the rules, pair selection, and the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from policymix.lab.pairs import load_pairs
from policymix.lab.synth import (
    EVAL_PROMPTS, RULES, Candidate, choose_pair, concise_reward, friendly_reward, training_prompts,
    whole_sentences,
)

PREFS = Path(__file__).resolve().parent.parent / "data" / "prefs"


def test_rules_score_as_documented():
    assert concise_reward("one two three") == -3.0
    assert friendly_reward("Hello there! Paris.") == 2.0
    assert friendly_reward("Paris!") == 1.0
    assert friendly_reward("I hope this helps.") == 1.0
    assert friendly_reward("The capital is Paris.") == 0.0
    assert friendly_reward("Ethics are hard.") == 0.0  # "hi" inside a word is not a greeting


def test_concise_pair_is_shortest_finished_vs_longest():
    cands = [Candidate("a b c d e f g h i j", True), Candidate("a b", False), Candidate("a b c", True),
             Candidate("a b c d e f", True)]
    chosen, rejected = choose_pair("concise", cands)
    assert (chosen.text, rejected.text) == ("a b c", "a b c d e f g h i j")  # "a b" never finished
    assert choose_pair("concise", [Candidate("a b c", True), Candidate("a b c d", True)]) is None  # not clear


def test_friendly_pair_needs_both_signals_and_matches_lengths():
    long_plain = Candidate("The answer is a long plain sentence with many words in it.", True)
    short_plain = Candidate("It is Paris.", True)
    warm = Candidate("Hello! It is Paris.", True)
    half = Candidate("It is Paris!", True)
    chosen, rejected = choose_pair("friendly", [long_plain, short_plain, warm, half])
    assert (chosen, rejected) == (warm, short_plain)
    assert choose_pair("friendly", [half, short_plain]) is None
    assert choose_pair("friendly", [Candidate("Hello friend, it is", False), short_plain]) is None  # cut, no '!'
    with pytest.raises(ValueError, match="unknown rule"):
        choose_pair("formal", [warm, short_plain])


def test_cut_answers_are_trimmed_to_whole_sentences():
    cut = Candidate("Hello! The sun is hot. It is", False)
    assert whole_sentences(cut) == Candidate("Hello! The sun is hot.", True)
    assert whole_sentences(Candidate('She said "hi." Then', False)) == Candidate('She said "hi."', True)
    assert whole_sentences(Candidate("no sentence end", False)) == Candidate("no sentence end", False)
    assert whole_sentences(Candidate("Done. Really", True)).text == "Done. Really"  # finished answers stay whole
    # a friendly answer cut by the budget still counts once trimmed, if its whole sentences score 2
    chosen, _ = choose_pair("friendly", [Candidate("Hello friend! It is Paris. And", False),
                                         Candidate("It is Paris.", True)])
    assert chosen.text == "Hello friend! It is Paris."


def test_prompts_are_distinct_and_eval_prompts_held_out():
    prompts = training_prompts(160)
    assert len(prompts) == len(set(prompts)) == 160
    assert not set(prompts) & set(EVAL_PROMPTS)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_shipped_sets_are_valid_and_follow_their_rule(rule):
    records = load_pairs(PREFS / f"{rule}.jsonl")  # raises on any bad line
    assert len(records) >= 64
    assert len({r["prompt"] for r in records}) == len(records)
    for r in records:
        assert r["rule"] == rule
        assert RULES[rule](r["chosen"]) > RULES[rule](r["rejected"]), r["prompt"]
        if rule == "concise":
            assert len(r["chosen"].split()) <= 0.6 * len(r["rejected"].split())
