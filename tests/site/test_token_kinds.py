"""Kinds of tokens (atlas.token_kinds): the rules that name clusters sharing no concept."""

from __future__ import annotations

import pytest

from atlas import lexicon, token_kinds
from atlas.token_kinds import CODE, ENDINGS, FUNCTION, NUMBERS, PIECES, PUNCTUATION, PYTHON, WORDS, Kinds, dominant


@pytest.fixture(scope="module")
def kinds():
    lex, why = lexicon.load()
    if lex is None:
        pytest.skip(why)
    return Kinds.build(lex)


@pytest.mark.parametrize("token, kind", [
    (" 2024", NUMBERS), ("3", NUMBERS), ("?](", PUNCTUATION), ("'}),", PUNCTUATION), (" ,", PUNCTUATION),
    (" ζω", "Greek script"), ("ομαι", "Greek script"), ("Привет", "Cyrillic script"), ("为", "CJK script"),
    ("ª", "other script"), ("ひらがな", "Hiragana script"),
    (" pathlib", PYTHON), (" getattr", PYTHON), ("RuntimeError", PYTHON), (" functools", PYTHON),
    ("CreateModel", CODE), (" setObjectName", CODE), ("__init__", CODE), ("_('x", CODE), (" {name}", CODE),
    (" her", FUNCTION), (" was", FUNCTION), (" The", FUNCTION),
    (" monkey", WORDS), (" list", WORDS), (" random", WORDS),           # Python names that are English words
    ("ing", ENDINGS), ("ly", ENDINGS), ("ity", ENDINGS),
    ("aughed", PIECES), (" eleph", PIECES), ("olkien", PIECES), (" veterin", PIECES),
    ("   ", None), (" \ufffd", None), ("", None),
])
def test_each_token_gets_the_first_kind_that_fits(kinds, token, kind):
    assert kinds.of(token) == kind


def test_without_a_lexicon_letters_are_pieces_unless_another_rule_fits():
    bare = Kinds.build(None)
    assert [bare.of(t) for t in (" monkey", " her", "ing", " pathlib", "ζω", "12")] == [
        PIECES, PIECES, PIECES, PYTHON, "Greek script", NUMBERS]


def test_python_names_come_from_this_interpreter():
    names = token_kinds.python_names()
    assert {"pathlib", "getattr", "RuntimeError", "makedirs", "lambda"} <= names
    assert not {n for n in names if len(n) < 3}


def test_a_specific_kind_names_a_list_from_four_tokens_and_pieces_need_a_majority():
    # 4 of 10 Python names beside 6 word pieces: the specific kind names it.
    assert dominant([PYTHON] * 4 + [PIECES] * 6, 4, 0.4, 0.6) == PYTHON
    assert dominant([PYTHON] * 3 + [PIECES] * 7, 4, 0.4, 0.6) == PIECES
    assert dominant([PYTHON] * 3 + [PIECES] * 5 + [WORDS] * 2, 4, 0.4, 0.6) is None
    # Plain words are no kind, whatever their share; nothing at all names nothing.
    assert dominant([WORDS] * 10, 4, 0.4, 0.6) is None
    assert dominant([None] * 3, 4, 0.4, 0.6) is None
    # Two specific kinds over the bar: the commoner one.
    assert dominant([CODE] * 4 + [NUMBERS] * 5 + [None], 4, 0.4, 0.6) == NUMBERS
