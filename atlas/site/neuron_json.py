"""The per-neuron JSON file (``neurons/<layer>/<neuron>.json``): compact, complete, versioned.

A site holds one such file per neuron, so its bytes are the site's bytes. The layout
(``FORMAT``, documented on the method page) is derived from the store's schema, not
written per table, so a table added to ``schema.JSON_TABLES`` is compacted the same way
with no code of its own:

- each table is one object of columns, ``{"token_id": [42, 7, ...], "logit": [...]}``, in the
  table's row order, instead of a list of row objects that repeat every key; a table whose
  key order (``JSON_TABLES``) starts with text columns is nested by them first, so that
  ``side`` and ``polarity`` are written once: ``{"out": {"top": {"token_id": [...], ...}}}``;
  a key order whose only key after the nesting ones is ``rank`` leaves the rank out, as the
  rows' place in their group;
- a table that has both ``token_id`` and ``token`` keeps only ``token_id``; the text of
  every token the file mentions is written once, in ``"tokens": {"<token_id>": "text"}``;
- floats carry ``FLOAT_DIGITS`` significant digits (the store keeps float32; the page shows
  three); NaN and infinities are null;
- a float array (an exemplar's window of activations) is one measurement, rounded to one
  step, ``ARRAY_DIGITS`` significant digits of its largest magnitude, and written as whole
  numbers of that step, with the step's decimal exponent beside it in ``"<name>_exp"``:
  ``[57, 19, 0, -4]`` with exponent ``-1`` is ``[5.7, 1.9, 0.0, -0.4]`` (a third of the bytes
  of decimal fractions, which were half of a default atlas's JSON);
- ``layer`` and ``neuron`` are said once, at the top (and in the ``neurons`` row, which is
  the table's row as it is), and left out of every other table.

DuckDB writes each of these objects in C++ (``to_json``), a block of neurons per query.
``table_rows`` turns a loaded file back into the store's rows, for readers and tests.
"""

from __future__ import annotations

from atlas.schema import JSON_TABLES

FORMAT = 3              # 1: row objects with float32-exact floats (before the site budgets); 2: arrays as decimals
FLOAT_DIGITS = 3
POSITION = "rank"       # a key column that numbers a group's rows 0, 1, 2, ...: implied by the order
ARRAY_DIGITS = 2        # a window of activations is drawn in sixths of the neuron's strip scale on the page
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


def compact(name: str, dtype: str) -> str:
    """SQL for column ``name`` with its floats cut to the digits that carry meaning (module doc).

    An array column needs its row's ``array_step`` as column ``"__step_<name>"``; its values
    come out as whole numbers of that step (``array_fields`` writes the step beside them).
    """
    rounded = f"CASE WHEN isfinite({{0}}) THEN CAST(printf('%.{FLOAT_DIGITS}g', {{0}}) AS DOUBLE) END"
    if dtype in _FLOATS:
        return rounded.format(f'"{name}"')
    if _is_array(dtype):
        # One step for the whole array, so that values near zero do not spend digits on noise.
        return (f'[CASE WHEN isfinite(a) THEN CAST(round(CAST(a AS DOUBLE) / pow(10, "__step_{name}")) AS BIGINT) END '
                f'FOR a IN "{name}"]')
    return f'"{name}"'


EXPONENT = "_exp"        # "<array column>_exp": the decimal exponent of that array's step


def array_fields(columns: list[tuple[str, str]], wrap: str = "{}") -> list[str]:
    """``struct_pack`` fields for the step exponents of the float array columns, each through ``wrap``."""
    return [f'"{name}{EXPONENT}" := {wrap.format(f"__step_{name}")}' for name, dtype in columns if _is_array(dtype)]


def table_sql(con, table: str, order: str) -> str:
    """A query for ``table``'s rows of one block, one JSON object per neuron (see the module doc).

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
    drop = {"layer", "neuron", *levels} | ({"token"} if has_token_text(columns) else set())
    if keys[len(levels):] == [POSITION]:    # a rank is the row's place in its group: 0, 1, 2, ...
        drop.add(POSITION)                  # (kept where a number key, exemplar_samples' band, comes first)
    fields = [f'"{name}" := list({compact(name, dtype)} ORDER BY {rest})' for name, dtype in columns if name not in drop]
    fields += array_fields(columns, f'list("{{}}" ORDER BY {rest})')
    steps = "".join(f', {array_step(name)} AS "__step_{name}"' for name, dtype in columns if _is_array(dtype))
    query = (f"SELECT neuron, {''.join(f'{k}, ' for k in levels)}struct_pack({', '.join(fields)}) AS v "
             f"FROM (SELECT *{steps} FROM {table} {_BLOCK}) GROUP BY ALL")
    for depth in range(len(levels) - 1, -1, -1):
        outer = "".join(f"{k}, " for k in levels[:depth])
        query = (f"SELECT neuron, {outer}map_from_entries(list({{'k': {levels[depth]}, 'v': v}} "
                 f"ORDER BY {levels[depth]})) AS v FROM ({query}) GROUP BY ALL")
    return f"SELECT neuron, to_json(v) FROM ({query})"


def tokens_sql(con, tables: list[str]) -> str | None:
    """A query for the text of every token that ``tables`` mention, one JSON object per neuron."""
    sources = [f"SELECT neuron, token_id, token FROM {t} {_BLOCK}" for t in tables if has_token_text(_columns(con, t))]
    if not sources:
        return None
    return ("SELECT neuron, to_json(map_from_entries(list(struct_pack(k := CAST(token_id AS VARCHAR), v := token) "
            f"ORDER BY token_id))) FROM (SELECT DISTINCT * FROM ({' UNION ALL '.join(sources)})) GROUP BY neuron")


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


def array_values(values: list, exp: int) -> list:
    """A float array back from its whole numbers of the step ``10 ** exp`` (see the module doc)."""
    return [None if v is None else round(v * 10.0 ** exp, max(-exp, 0)) for v in values]


def with_arrays(columns: dict) -> dict:
    """``columns`` (a table's object of columns) with each float array put back from its whole
    numbers and its ``"<name>_exp"`` column, which is dropped."""
    out = dict(columns)
    for key in [k for k in columns if k.endswith(EXPONENT) and k[:-len(EXPONENT)] in columns]:
        name, exp = key[:-len(EXPONENT)], out.pop(key)
        out[name] = [None if v is None else array_values(v, e) for v, e in zip(out[name], exp)]
    return out


def table_rows(data: dict, table: str) -> list[dict]:
    """``table``'s rows from a loaded neuron JSON file, as the store holds them (less layer and
    neuron, floats as written), in key order; token text is put back from ``"tokens"``."""
    keys = [k.strip() for k in JSON_TABLES[table].split(",")]
    rows: list[dict] = []

    def walk(node: dict, path: dict, depth: int) -> None:
        if node and all(isinstance(v, dict) for v in node.values()):
            for value, child in node.items():
                walk(child, {**path, keys[depth]: value}, depth + 1)
            return
        node = with_arrays(node)
        n = len(next(iter(node.values()))) if node else 0
        implied = {POSITION: None} if keys[-1] == POSITION and POSITION not in node else {}
        rows.extend({**path, **{k: i for k in implied}, **{name: col[i] for name, col in node.items()}}
                    for i in range(n))

    walk(data.get(table) or {}, {}, 0)
    tokens = data.get("tokens")
    if tokens is not None:
        for row in rows:
            if "token_id" in row:
                row["token"] = tokens.get(str(row["token_id"]))
    return rows
