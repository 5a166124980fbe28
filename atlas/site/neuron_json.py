"""The per-neuron JSON file (``neurons/<layer>/<neuron>.json``): compact, complete, versioned.

A site holds one such file per neuron, so its bytes are the site's bytes. The layout
(``FORMAT``, documented on the method page) is derived from the store's schema, not
written per table, so a table added to ``schema.JSON_TABLES`` is compacted the same way
with no code of its own:

- each table is one object of columns, ``{"doc_id": [42, 7, ...], "activation": [...]}``, in
  the table's row order, instead of a list of row objects that repeat every key; a table whose
  key order (``JSON_TABLES``) starts with text columns is nested by them first, so that
  ``side`` and ``polarity`` are written once: ``{"out": {"top": {"token": [...], ...}}}``; the
  innermost object is a *group*; a key order whose only key after the nesting ones is ``rank``
  leaves the rank out, as the rows' place in their group;
- token text is the site's, not the file's: ``vocab.json`` at the site's root lists every
  token of the vocabulary, ``{"token": [...]}`` by id, and a file names it in ``"vocab"`` (a
  URL relative to the file, ``"../../vocab.json"``). A 128k vocabulary is about 1 MB once,
  where each file's own copy of the text it mentions cost 1.6 KB of the 8B shape's 13.6 KB;
- the tokens a file mentions are one table of their own, ``"tokens": {"token_id_diff": [...]}``
  by id, ascending, each id written as its difference from the one before (the first from 0:
  ``[17, 243]`` is ids 17 and 260; a vocabulary of 128k ids costs 6 digits an id, a
  difference about 3); a table that has both ``token_id`` and ``token`` writes instead
  ``token``, each row's place in ``"tokens"`` (a dictionary: a small index for an id that
  would be written again and again);
- a float column of a group is one measurement, written as whole numbers of one step, a
  power of ten whose exponent is beside it in ``"<name>_exp"``: ``[397, 372]`` with ``-2`` is
  ``[3.97, 3.72]``. The step gives the group's largest magnitude ``FLOAT_DIGITS`` significant
  digits, or more (up to ``MOST_DIGITS``) where the smallest non-zero one would keep fewer than
  ``LEAST_DIGITS``; a logit's step is at most 0.01 (``COARSEST``). Decimal fractions with
  their leading ``0.000`` cost twice the bytes;
- a float array (an exemplar's window of activations) is rounded the same way per row, to
  ``ARRAY_DIGITS`` significant digits of its largest magnitude, with one exponent per row;
- a lone float (the ``neurons`` row, a table with one row per neuron) carries
  ``FLOAT_DIGITS`` significant digits; NaN and infinities are null everywhere;
- columns that follow from others are left out and put back by ``table_rows``:
  ``norm_activation`` is ``activation / normaliser`` (DESIGN.md's definition, with the
  ``neurons`` row's normaliser), and ``prob`` is ``exp(logit - lse)``, ``lse`` being the
  log-sum-exp of the side's logits over the whole vocabulary, written once per group
  (``LSE_DECIMALS`` decimals: the logits' own rounding is what limits a probability);
- ``window_start`` is ``token_pos - window_before`` where one ``window_before`` holds for
  every row of the table (the exemplars stage writes it so), which the group then gives once;
- ``layer`` and ``neuron`` are said once, at the top (and in the ``neurons`` row, which is
  the table's row as it is), and left out of every other table.

DuckDB writes each of these objects in C++ (``to_json``), a block of neurons per query.
``load`` reads a file with its token text from ``vocab.json``; ``table_rows`` turns it back
into the store's rows, for readers and tests.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from atlas.schema import JSON_TABLES

FORMAT = 6              # 1: row objects; 2: arrays as decimals; 3: 3-digit decimals, token text keyed by id;
                        # 4: whole numbers of a step, derived columns left out; 5: token ids as differences,
                        # window_start as one window_before; 6: token text in the site's vocab.json
FLOAT_DIGITS = 3        # significant digits of a lone float, and of the largest magnitude of a group's column
LEAST_DIGITS = 2        # ... and of its smallest non-zero magnitude, as long as the largest
MOST_DIGITS = 6         # then has no more than this (an attribution list spans ~200x, a few 10,000x)
COARSEST = {"logit": -2}  # a logit is whole hundredths or finer, so that exp(logit - lse) keeps 3 digits
ARRAY_DIGITS = 2        # a window of activations is drawn in sixths of the neuron's strip scale on the page
LSE_DECIMALS = 4
POSITION = "rank"       # a key column that numbers a group's rows 0, 1, 2, ...: implied by the order
EXPONENT = "_exp"       # "<float column>_exp": the decimal exponent of that column's step
TOKEN = "token"         # in a table: a row's place in the file's "tokens"
TOKEN_ID_DIFF = "token_id_diff"     # in "tokens": each id less the one before it (the first less 0)
VOCAB = "vocab"         # at the top: the site's token text, relative to the file
VOCAB_FILE = "vocab.json"           # at the site's root: {"token": [text by id]}
VOCAB_URL = "../../" + VOCAB_FILE   # from neurons/<layer>/<neuron>.json
LSE = "lse"             # in a group of decoded tokens: the side's log-sum-exp, prob = exp(logit - lse)
NORMALISED = ("norm_activation", "activation")   # left out: activation / the neurons row's normaliser
SOFTMAX = ("prob", "logit")                      # left out: exp(logit - lse)
WINDOW = ("window_activations", "window_start")  # an array of activations and the input position of its first
PEAK = "token_pos"      # the exemplar's own position: window_start = token_pos - window_before
OFFSET = "window_before"  # a group's token_pos - window_start, where one number holds for the whole table
LENGTH = "_len"         # "<window>_len": a group's window length, to pad a window back to it
SOFTMAX_OVER = "side"                            # lse is one per side: its logits over the whole vocabulary
_FLOATS = ("FLOAT", "DOUBLE")
_BLOCK = "WHERE layer = $1 AND neuron >= $2 AND neuron < $3"


def _columns(con, table: str) -> list[tuple[str, str]]:
    return [(name, dtype) for name, dtype, *_ in con.execute(f"DESCRIBE {table}").fetchall()]


def has_token_text(columns: list[tuple[str, str]]) -> bool:
    names = {name for name, _ in columns}
    return {"token_id", "token"} <= names


def _is_array(dtype: str) -> bool:
    return dtype.startswith(tuple(f"{t}[" for t in _FLOATS))


def array_step(name: str) -> str:
    """SQL for the decimal exponent an array's values are rounded to (one per row, see ``compact``)."""
    top = f'list_max([abs(a) FOR a IN "{name}" IF isfinite(a)])'
    return f"CAST(floor(log10(CASE WHEN {top} > 0 THEN {top} ELSE 1 END)) AS INTEGER) - {ARRAY_DIGITS - 1}"


def group_step(name: str, group: str) -> str:
    """SQL for the decimal exponent of column ``name``'s step in each row's group (``PARTITION BY group``)."""
    finite = f'CASE WHEN isfinite("{name}") AND "{name}" <> 0 THEN abs(CAST("{name}" AS DOUBLE)) END'
    top, low = (f"floor(log10({agg}({finite}) OVER (PARTITION BY {group})))" for agg in ("max", "min"))
    step = f"greatest(least({top} - {FLOAT_DIGITS - 1}, {low} - {LEAST_DIGITS - 1}), {top} - {MOST_DIGITS - 1})"
    if name in COARSEST:
        step = f"least({step}, {COARSEST[name]})"
    return f"CAST(coalesce({step}, {COARSEST.get(name, 0)}) AS INTEGER)"


def _whole(value: str, step: str) -> str:
    """SQL for a float as a whole number of the step ``10 ** step``; NaN and infinities are null."""
    return f"CASE WHEN isfinite({value}) THEN CAST(round(CAST({value} AS DOUBLE) / pow(10, {step})) AS BIGINT) END"


def compact(name: str, dtype: str) -> str:
    """SQL for column ``name`` of one row with its floats cut to the digits that carry meaning (module doc).

    An array column needs its row's ``array_step`` as column ``"__step_<name>"``; its values
    come out as whole numbers of that step (``array_fields`` writes the step beside them).
    """
    if dtype in _FLOATS:
        return f"CASE WHEN isfinite(\"{name}\") THEN CAST(printf('%.{FLOAT_DIGITS}g', \"{name}\") AS DOUBLE) END"
    if _is_array(dtype):
        # One step for the whole array, so that values near zero do not spend digits on noise.
        step = f'"__step_{name}"'
        return f'[{_whole("a", step)} FOR a IN "{name}"]'
    return f'"{name}"'


def array_fields(columns: list[tuple[str, str]], wrap: str = "{}") -> list[str]:
    """``struct_pack`` fields for the step exponents of the float array columns, each through ``wrap``."""
    return [f'"{name}{EXPONENT}" := {wrap.format(f"__step_{name}")}' for name, dtype in columns if _is_array(dtype)]


def _last_where(values: str, test: str) -> str:
    """SQL for the 1-based place of the last element ``a`` of list ``values`` for which ``test`` holds (0: none)."""
    from_end = f"list_position(list_reverse([{test} FOR a IN {values}]), true)"
    return f"coalesce(len({values}) + 1 - {from_end}, 0)"


def _last_value(name: str) -> str:
    """SQL for the 1-based place of array ``name``'s last finite value (0 where it has none)."""
    return _last_where(f'"{name}"', "coalesce(isfinite(a), false)")


def _trimmed(values: str) -> str:
    """SQL for list ``values`` without its trailing nulls (``group_columns`` pads them back)."""
    return f"list_slice({values}, 1, {_last_where(values, 'a IS NOT NULL')})"


TOKEN_INDEX = "__atlas_tokens"      # a block's token index, a temporary table the table queries join


def token_index_sql(con, tables: list[str]) -> str | None:
    """SQL that makes ``TOKEN_INDEX`` for one block: every token that ``tables`` mention, per
    neuron, as ``neuron, token_id`` and ``__token``, its place in the file's ``"tokens"``
    (by id, from 0). Made once per block, it is read by ``tokens_sql`` and every ``table_sql``
    that points into it (made inside each, it was a fifth of the JSON's time)."""
    sources = [f"SELECT neuron, token_id FROM {t} {_BLOCK}" for t in tables if has_token_text(_columns(con, t))]
    if not sources:
        return None
    return (f"CREATE OR REPLACE TEMP TABLE {TOKEN_INDEX} AS SELECT neuron, token_id, "
            "CAST(row_number() OVER (PARTITION BY neuron ORDER BY token_id) - 1 AS INTEGER) AS __token "
            f"FROM ({' UNION ALL '.join(sources)}) GROUP BY neuron, token_id")


def window_offset(con, table: str, types: dict) -> int | None:
    """``token_pos - window_start`` where it is one number for every row of ``table`` that has a
    window start (the window's tokens before the peak); None where it is not, or there is none."""
    if not {PEAK, WINDOW[1]} <= types.keys():
        return None
    kinds, offset = con.execute(f'SELECT count(DISTINCT "{PEAK}" - "{WINDOW[1]}"), min("{PEAK}" - "{WINDOW[1]}") '
                                f'FROM {table}').fetchone()
    has_null = con.execute(f'SELECT count(*) FROM {table} WHERE "{WINDOW[1]}" IS NULL AND "{PEAK}" IS NOT NULL').fetchone()[0]
    return int(offset) if kinds == 1 and not has_null else None


def table_sql(con, table: str, order: str, tables: list[str]) -> str:
    """A query for ``table``'s rows of one block, one JSON object per neuron (see the module doc);
    ``tables`` are all the tables the file holds, whose tokens share one ``"tokens"``.

    Its parameters are ``$1`` layer, ``$2`` first neuron, ``$3`` end of the block.
    """
    columns = _columns(con, table)
    types = dict(columns)
    keys = [k.strip() for k in order.split(",")]
    # The leading text keys of the order nest the table: {"out": {"top": {columns}}}.
    levels = []
    for key in keys:
        if types.get(key) != "VARCHAR":
            break
        levels.append(key)
    rest = ", ".join(keys[len(levels):]) or "1"
    group = ", ".join(["neuron", *levels])
    tokens = has_token_text(columns)
    drop = {"layer", "neuron", *levels} | ({"token"} if tokens else set())
    if keys[len(levels):] == [POSITION]:    # a rank is the row's place in its group: 0, 1, 2, ...
        drop.add(POSITION)                  # (kept where a number key, exemplar_samples' band, comes first)
    for derived, source in (NORMALISED, SOFTMAX):
        if {derived, source} <= types.keys():
            drop.add(derived)
    offset = window_offset(con, table, types)
    if offset is not None:
        drop.add(WINDOW[1])
    softmax = set(SOFTMAX) <= types.keys()
    per_neuron = keys == ["neuron"]         # one row per neuron: its floats are lone floats
    fields, helpers = [], []
    for name, dtype in columns:
        if name in drop:
            continue
        if name == "token_id" and tokens:
            fields.append(f'"{TOKEN}" := list(__token ORDER BY {rest})')
        elif dtype in _FLOATS and not per_neuron:
            helpers.append(f'{group_step(name, group)} AS "__step_{name}"')
            column, step = f'"{name}"', f'"__step_{name}"'
            fields += [f'"{name}" := list({_whole(column, step)} ORDER BY {rest})',
                       f'"{name}{EXPONENT}" := min("__step_{name}")']
        elif name == WINDOW[0] and WINDOW[1] in types:
            # Only the window's positions inside the input: from max(start, 0) to its last value.
            inside = f"list_slice({compact(name, dtype)}, greatest(0, -\"{WINDOW[1]}\") + 1, {_last_value(name)})"
            # Ranks deeper than --window-ranks have no window: their trailing nulls are left out.
            helpers.append(f'CASE WHEN "{name}" IS NOT NULL THEN {array_step(name)} END AS "__step_{name}"')
            windows = _trimmed(f"list({inside} ORDER BY {rest})")
            steps = _trimmed(f'list("__step_{name}" ORDER BY {rest})')
            fields += [f'"{name}" := {windows}', f'"{name}{EXPONENT}" := {steps}',
                       f'"{name}{LENGTH}" := max(len("{name}"))']
        else:
            fields.append(f'"{name}" := list({compact(name, dtype)} ORDER BY {rest})')
            if _is_array(dtype):
                helpers.append(f'{array_step(name)} AS "__step_{name}"')
                fields.append(f'"{name}{EXPONENT}" := list("__step_{name}" ORDER BY {rest})')
    if offset is not None:
        fields.append(f'"{OFFSET}" := {offset}')
    if softmax:
        # The side's log-sum-exp, from its most probable token: logit - ln(prob) is the same for every row.
        prob, logit = (f'CAST("{c}" AS DOUBLE)' for c in SOFTMAX)
        key = f"CASE WHEN isfinite({prob}) AND {prob} > 0 THEN {prob} END"
        side = ", ".join(["neuron", *[k for k in levels if k == SOFTMAX_OVER]])
        helpers.append(f"round(max_by(CASE WHEN {key} > 0 THEN {logit} - ln({prob}) END, {key}) "
                       f"OVER (PARTITION BY {side}), {LSE_DECIMALS}) AS __lse")
        fields.append(f'"{LSE}" := min(__lse)')
    source = f"(SELECT * FROM {table} {_BLOCK})"
    if tokens:
        source = f"(SELECT * FROM {source} JOIN {TOKEN_INDEX} USING (neuron, token_id))"
    query = (f"SELECT neuron, {''.join(f'{k}, ' for k in levels)}struct_pack({', '.join(fields)}) AS v "
             f"FROM (SELECT *{''.join(f', {h}' for h in helpers)} FROM {source}) GROUP BY ALL")
    for depth in range(len(levels) - 1, -1, -1):
        outer = "".join(f"{k}, " for k in levels[:depth])
        query = (f"SELECT neuron, {outer}map_from_entries(list({{'k': {levels[depth]}, 'v': v}} "
                 f"ORDER BY {levels[depth]})) AS v FROM ({query}) GROUP BY ALL")
    return f"SELECT neuron, to_json(v) FROM ({query})"


def tokens_sql(con, tables: list[str]) -> str | None:
    """A query for the file's ``"tokens"`` from ``TOKEN_INDEX``, one JSON object per neuron."""
    if token_index_sql(con, tables) is None:
        return None
    diff = "token_id - coalesce(lag(token_id) OVER (PARTITION BY neuron ORDER BY token_id), 0)"
    return (f'SELECT neuron, to_json(struct_pack("{TOKEN_ID_DIFF}" := list(__diff ORDER BY token_id))) '
            f"FROM (SELECT *, {diff} AS __diff FROM {TOKEN_INDEX}) GROUP BY neuron")


def vocab_by_id(con) -> list[str | None]:
    """The store's token text as a list indexed by token id (None for an id it has no text for)."""
    rows = con.execute("SELECT token_id, token FROM vocab ORDER BY token_id").fetchall()
    text: list[str | None] = [None] * ((rows[-1][0] + 1) if rows else 0)
    for token_id, token in rows:
        text[token_id] = token
    return text


def vocab_json(con) -> dict:
    """``vocab.json``: every token's text, by id (null for an id the store has no text for)."""
    return {"token": vocab_by_id(con)}


def neurons_sql(con) -> str:
    """The neurons rows of one block as the store holds them (for the page), each followed by
    the same row as one compact JSON object (for the file)."""
    columns = _columns(con, "neurons")
    cols = ", ".join([f'"{name}" := {compact(name, dtype)}' for name, dtype in columns]
                     + array_fields(columns, '"{}"'))
    steps = "".join(f', {array_step(name)} AS "__step_{name}"' for name, dtype in columns if _is_array(dtype))
    plain = ", ".join(f'"{name}"' for name, _ in columns)
    return (f"SELECT {plain}, to_json(struct_pack({cols})) FROM (SELECT *{steps} FROM neurons {_BLOCK}) "
            "ORDER BY neuron")


# -- reading a file back -----------------------------------------------------------------------
def number(whole: int | None, exp: int) -> float | None:
    """A float back from its whole number of the step ``10 ** exp`` (see the module doc)."""
    if whole is None:
        return None
    return whole / 10 ** -exp if exp < 0 else float(whole * 10 ** exp)


def array_values(values: list, exp: int) -> list:
    """A float array back from its whole numbers of the step ``10 ** exp``."""
    return [number(v, exp) for v in values]


def _padded(window: list, start: int, length: int) -> list:
    """A window back to its full ``length`` with nulls for its positions outside the input."""
    lead = max(0, -start)
    return [None] * lead + window + [None] * (length - lead - len(window))


@lru_cache(maxsize=4)
def _vocab(path: str, mtime_ns: int) -> tuple:
    return tuple(json.loads(Path(path).read_text(encoding="utf-8"))["token"])


def load(path: str | Path) -> dict:
    """A neuron's JSON file, with the text of its ``"tokens"`` from the ``vocab.json`` it names."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data.get(VOCAB), str):
        vocab = (path.parent / data[VOCAB]).resolve()
        data = with_vocab(data, _vocab(str(vocab), vocab.stat().st_mtime_ns))
    return data


def with_vocab(data: dict, vocab) -> dict:
    """``data`` with ``"tokens"`` given the text of each of its ids from ``vocab`` (a list by id)."""
    table = token_table(data)
    if table is None:
        return data
    return {**data, "tokens": {**data["tokens"], "token": [vocab[i] for i in table["token_id"]]}}


def token_table(data: dict) -> dict | None:
    """The file's ``"tokens"`` as ``{"token_id": [...], "token": [...]}``, ids summed back from
    their differences, text where ``with_vocab`` gave it (else None); None where the file lists none."""
    tokens = data.get("tokens")
    if not isinstance(tokens, dict) or TOKEN_ID_DIFF not in tokens:
        return None
    ids, at = [], 0
    for d in tokens[TOKEN_ID_DIFF]:
        at += d
        ids.append(at)
    return {"token_id": ids, "token": tokens.get("token") or [None] * len(ids)}


def group_columns(node: dict, data: dict) -> dict:
    """A group's columns as the store holds them: floats from their whole numbers and ``"<name>_exp"``,
    ``token_id`` and ``token`` from the file's ``"tokens"``, and the columns left out put back."""
    out = {}
    if OFFSET in node and PEAK in node:
        node = {**node, WINDOW[1]: [None if p is None else p - node[OFFSET] for p in node[PEAK]]}
    for name, col in node.items():
        if name in (LSE, OFFSET) or any(name.endswith(x) and name[:-len(x)] in node for x in (EXPONENT, LENGTH)):
            continue
        exp = node.get(name + EXPONENT)
        if exp is None:
            out[name] = col
        elif isinstance(exp, list):        # an array column: one exponent per row
            out[name] = [None if v is None else array_values(v, e) for v, e in zip(col, exp)]
            if name == WINDOW[0] and name + LENGTH in node:
                starts = node[WINDOW[1]]        # the rows with no window at the end were left out
                out[name] = [None if v is None else _padded(v, start, node[name + LENGTH])
                             for v, start in zip(out[name], starts)] + [None] * (len(starts) - len(out[name]))
        else:
            out[name] = [number(v, exp) for v in col]
    tokens = token_table(data)
    if TOKEN in out and tokens is not None:
        places = out.pop(TOKEN)
        out["token_id"] = [tokens["token_id"][i] for i in places]
        out["token"] = [tokens["token"][i] for i in places]
    if LSE in node:
        lse = node[LSE]
        out[SOFTMAX[0]] = [None if v is None or lse is None else math.exp(v - lse) for v in out[SOFTMAX[1]]]
    if NORMALISED[1] in out:
        normaliser = (data.get("neurons") or {}).get("normaliser")
        ok = normaliser is not None and normaliser > 0
        out[NORMALISED[0]] = [v / normaliser if ok and v is not None else None for v in out[NORMALISED[1]]]
    return out


def table_rows(data: dict, table: str) -> list[dict]:
    """``table``'s rows from a loaded neuron JSON file, as the store holds them (less layer and
    neuron, floats to the file's digits), in key order."""
    keys = [k.strip() for k in JSON_TABLES[table].split(",")]
    rows: list[dict] = []

    def walk(node: dict, path: dict, depth: int) -> None:
        if node and all(isinstance(v, dict) for v in node.values()):
            for value, child in node.items():
                walk(child, {**path, keys[depth]: value}, depth + 1)
            return
        cols = group_columns(node, data)
        n = len(next(iter(cols.values()))) if cols else 0
        implied = {POSITION: None} if keys[-1] == POSITION and POSITION not in cols else {}
        rows.extend({**path, **{k: i for k in implied}, **{name: col[i] for name, col in cols.items()}}
                    for i in range(n))

    walk(data.get(table) or {}, {}, 0)
    return rows
