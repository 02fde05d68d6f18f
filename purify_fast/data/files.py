"""User data: CSV / TSV / JSONL files with configurable text and label columns, and Hugging Face
datasets saved with ``Dataset.save_to_disk`` (read through the ``datasets`` package, imported only
when such a directory is given).

Labels may be integers in ``[0, num_labels)`` or strings; string labels are mapped through
``label_map`` when given, else numbered in sorted order. Every problem is reported as a
:class:`DataFileError` naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from purify_fast.data.text_dataset import TextDataset

FORMATS = ("csv", "tsv", "jsonl", "hf")


class DataFileError(ValueError):
    """A user data file that cannot be read as labelled text; the message names file/line/column."""

    def __init__(self, path, message: str, line: int | None = None, column: str | None = None):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.column = str(path), line, column


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".csv",):
        return "csv"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise DataFileError(path, f"cannot tell the format from the suffix {suffix!r}: name the file "
                              f".csv, .tsv or .jsonl (or, in Python, pass format= one of "
                              f"{', '.join(FORMATS)})")


def _is_int_text(name: str) -> bool:
    return name.lstrip("-").isdigit()


def _whole_number(raw) -> int | None:
    if isinstance(raw, bool):
        return None
    try:
        number = float(raw.strip()) if isinstance(raw, str) else raw
    except ValueError:
        return None
    if isinstance(number, int):
        return number
    return int(number) if isinstance(number, float) and number.is_integer() else None


def _label_value(raw, path, line, column, num_labels, label_map):
    if label_map is not None:
        key = raw if not isinstance(raw, str) else raw.strip()
        names = {str(k): k for k in _names_in(label_map)}
        whole = _whole_number(key)
        if whole is not None and any(_is_int_text(n) for n in names):
            # Classes named by numbers (yelp_polarity's "1" / "2"): a number is one of those
            # names or refused, never an index, which may be another class's name ("0" and "1"
            # of a file labelled by index would both become class "1").
            for spelling in (str(key), str(whole)):  # "01" may be a name; "2.0" is "2"
                if spelling in names:
                    return label_map[names[spelling]]
            raise _number_not_a_name(raw, whole, path, line, column, label_map, names)
        for spelling in (key, str(key)):
            if spelling in label_map:
                return label_map[spelling]
        # "2.0", as spreadsheets and pandas write class 2
        if whole is not None and str(whole) in label_map:
            return label_map[str(whole)]
        # A class name that differs only in case (Positive / positive), as for saved datasets
        # and named corpora; one matching several classes is ambiguous.
        same = _same_but_case(str(key), label_map)
        if len(same) == 1:
            return label_map[same[0]]
        named = [f"{k}={v}" for k, v in label_map.items() if not _is_int_text(str(k))]
        classes = ", ".join(named) if named else ", ".join(sorted(map(str, label_map)))
        if same:
            raise DataFileError(path, f"label {raw!r} is ambiguous: it names the classes "
                                      f"{', '.join(same)} when case is ignored", line, column)
        raise DataFileError(path, f"label {raw!r} is not one of the classes ({classes})",
                            line, column)
    if isinstance(raw, bool):
        raise DataFileError(path, f"label {raw!r} is a boolean, expected an integer", line, column)
    number = raw
    if isinstance(raw, str):
        try:  # "1" and "1.0" (what spreadsheets and pandas write) are class 1; "fresh" is a name
            number = float(raw.strip())
        except ValueError:
            return raw.strip()  # a string label, numbered later
    if isinstance(number, int):
        value = number
    elif isinstance(number, float) and number.is_integer():
        value = int(number)
    else:
        raise DataFileError(path, f"label {raw!r} is not a whole number (a class index) or a "
                                  f"class name", line, column)
    if num_labels is not None and not 0 <= value < num_labels:
        raise DataFileError(path, f"label {value} is out of range [0, {num_labels})", line, column)
    if value < 0:
        raise DataFileError(path, f"label {value} is negative", line, column)
    return value


def _number_not_a_name(raw, whole, path, line, column, label_map, names) -> DataFileError:
    ordered = sorted(names, key=lambda n: label_map[names[n]])
    shown = ", ".join(ordered)
    if 0 <= whole < len(set(label_map.values())):
        by_index = next(n for n in ordered if label_map[names[n]] == whole)
        return DataFileError(path, f"label {raw!r} is ambiguous: the classes are named by numbers "
                                   f"({shown}) and {whole} is none of them, so it could be index "
                                   f"{whole} (class {by_index!r}) or a name for another class; "
                                   f"write the class names ({shown}) as the labels", line, column)
    return DataFileError(path, f"label {raw!r} is not one of the classes ({shown}); write the "
                               f"class names as the labels", line, column)


def _finish(path, rows, num_labels, name, text_column, label_column) -> TextDataset:
    """rows: (line, text, label) with labels int or str; numbers string labels, checks ranges."""
    if not rows:
        raise DataFileError(path, "no examples (the file is empty or has only a header)")
    kinds = {type(y) for _, _, y in rows}
    label_names = None
    if str in kinds:
        if int in kinds:
            first = type(rows[0][2])
            line, _, odd = next(r for r in rows if not isinstance(r[2], first))
            kind = {int: "class indices", str: "class names"}
            raise DataFileError(path, f"label {odd!r} mixes {kind[type(odd)]} into {kind[first]} "
                                      f"(line {rows[0][0]} has {rows[0][2]!r})", line, label_column)
        label_names = tuple(sorted({y for _, _, y in rows}))
        mapping = {n: i for i, n in enumerate(label_names)}
        rows = [(ln, t, mapping[y]) for ln, t, y in rows]
    top = max(y for _, _, y in rows)
    if num_labels is None:
        # The class count comes from the largest index (at least 2: a binary file may hold one
        # class only): refuse gaps beyond that, or one stray label (1e12) would make a model
        # with that many classes (and hang the split over them).
        present = sorted({y for _, _, y in rows})
        if top >= 2 and len(present) != top + 1:
            missing = top + 1 - len(present)
            gaps, expect = [], 0
            for y in present:  # the first few missing indices, never a range as large as `top`
                while expect < y and len(gaps) < 5:
                    gaps.append(expect)
                    expect += 1
                if len(gaps) == 5:
                    break
                expect = y + 1
            shown = ", ".join(map(str, gaps)) + (", ..." if missing > len(gaps) else "")
            line = next(ln for ln, _, y in rows if y == top)
            raise DataFileError(path, f"label {top} implies {top + 1} classes, but {missing} of "
                                      f"them ({shown}) have no example: class indices must run "
                                      f"from 0 without gaps (or label with class names)",
                                line, label_column)
        num_labels = max(2, top + 1)
    elif top >= num_labels:
        line = next(ln for ln, _, y in rows if y == top)
        raise DataFileError(path, f"label {top} is out of range [0, {num_labels})", line, label_column)
    return TextDataset([t for _, t, _ in rows], [y for _, _, y in rows], num_labels,
                       name or Path(path).name, label_names)


def _check_text(path, line, column, value) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataFileError(path, "empty text", line, column)
    if not isinstance(value, str):
        raise DataFileError(path, f"text must be a string, got {type(value).__name__}", line, column)
    if "\ufffd" in value:
        raise DataFileError(path, "text contains undecodable bytes (U+FFFD)", line, column)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON): no tokenizer takes it
        raise DataFileError(path, f"text is not valid Unicode ({exc.reason} at character "
                                  f"{exc.start})", line, column) from None
    return value


def _read_text(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFileError(path, "the file is empty")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataFileError(path, f"undecodable bytes for encoding {encoding!r} at byte "
                                  f"{exc.start}: {exc.reason}", line) from None
    # A byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    return text[1:] if text.startswith("\ufeff") else text


def _check_header(path, header, columns, line=1) -> None:
    """Refuse the text or label column named twice (the first would win silently: which one
    holds the labels?); other repeats, as a spreadsheet's unnamed trailing columns, are unread."""
    for name in columns:
        if name is not None and header.count(name) > 1:
            raise DataFileError(path, f"the column {name!r} appears twice in the header; rename "
                                      f"one of them", line, name)


def _note(path, line, message) -> None:
    """A doubt about a file that is still read: on stderr, as the package's other notes."""
    where = f"{path}, line {line}" if line is not None else str(path)
    print(f"note: {where}: {message}", file=sys.stderr)


def _csv_error(path, exc, start, end) -> DataFileError:
    """A strict-mode csv error, blamed on the line where the record (its quoted field) began, not
    where the reader gave up (at the end of the file for a quote never closed)."""
    if "unexpected end of data" in str(exc):
        return DataFileError(path, "a quoted field starts on this line and is never closed (the "
                                   "file ends inside it): a quote that is part of the text must "
                                   "be doubled (\"\") inside a quoted field", start)
    if "expected after" in str(exc):
        where = f"on line {end}" if end != start else "on this line"
        return DataFileError(path, f"a quote opens a field on this line and the next quote "
                                   f"({where}) is followed by more text, not by a comma or the "
                                   f"line's end: a quote that is part of the text must be "
                                   f"doubled (\"\"), in a quoted field", start)
    return DataFileError(path, f"cannot parse: {exc}", start)


def _read_delimited(path: Path, delimiter: str, text_column, label_column, num_labels,
                    label_map, encoding, name) -> TextDataset:
    import io

    text = _read_text(path, encoding)
    # Lines as the csv reader counts them (\n, \r\n, \r), to look inside multi-line records.
    lines = io.StringIO(text, newline="").readlines()
    if delimiter == "\t":
        # TSV (GLUE / SST style): tabs separate, quote characters are text. With quoting a text
        # starting with " silently swallowed the rows up to the next quote.
        reader = csv.reader(iter(lines), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        # strict: a quote closed before more text, or never closed, is an error, not a merge
        reader = csv.reader(iter(lines), delimiter=delimiter, strict=True)
    # A field can be no longer than the file (already in memory); the default 128 KiB limit
    # refused long texts with a bare csv error.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        records = []
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise _csv_error(path, exc, start, reader.line_num) from None
            records.append((start, reader.line_num, row))
    finally:
        csv.field_size_limit(limit)
    if not records:
        raise DataFileError(path, "the file is empty")
    _, _, header = records[0]
    header = [h.strip() for h in header]
    _check_header(path, header, (text_column, label_column))
    for col in (text_column, label_column):
        if col is not None and col not in header:
            raise DataFileError(path, f"missing column {col!r} (the header has {header})", 1, col)
    ti = header.index(text_column)
    li = None if label_column is None else header.index(label_column)
    rows = []
    for line, last, row in records[1:]:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataFileError(path, f"{len(row)} fields, the header has {len(header)}", line)
        t = _check_text(path, line, text_column, row[ti])
        if li is None:
            rows.append((line, t, 0))
            continue
        y = row[li]
        if not y.strip():
            raise DataFileError(path, "empty label", line, label_column)
        rows.append((line, t, _label_value(y, path, line, label_column, num_labels, label_map)))
    if li is not None:
        _check_swallowed_rows(path, lines, records[1:], len(header), li, delimiter)
    if delimiter == "\t":
        _check_tsv_quoting(path, records[1:])
    return _finish(path, rows, num_labels, name, text_column, label_column)


def _fields(text, delimiter):
    try:
        return next(csv.reader([text], delimiter=delimiter))
    except (csv.Error, StopIteration):
        return []


def _check_swallowed_rows(path, lines, records, width, li, delimiter) -> None:
    """Note quoted fields whose lines read as rows of this file (the header's number of fields,
    a label the file uses where the label column falls): a quote left open may have merged rows
    into one text. Only a note: valid CSV may hold such lines (a review's "out of 10, 1")."""
    labels = {row[li].strip() for _, _, row in records if len(row) == width}

    def a_row(fields, first, count):  # the label among fields[first:first + count]
        return (len(fields) == width and first <= li < first + count
                and fields[li].strip() in labels)

    found = []  # (first line, last line, which line reads as a row)
    for start, last, row in records:
        broken = [j for j, field in enumerate(row) if "\n" in field or "\r" in field]
        if last == start or not broken:
            continue
        # The opening line after the quote (and the fields before it), the closing line up to
        # its quote (and the fields after it): a quote left open merges two rows there.
        first, end = broken[0], broken[-1]
        opening = re.split(r"\r\n|\r|\n", row[first])[0]
        closing = re.split(r"\r\n|\r|\n", row[end])[-1]
        rest, prefix = _fields(opening, delimiter), _fields(closing, delimiter)
        if a_row(row[:first] + rest, first, len(rest)):
            found.append((start, last, f"this line after the quote ({opening[:60]!r})"))
        elif a_row(prefix + row[end + 1:], 0, len(prefix)):
            found.append((start, last, f"line {last} up to the quote ({closing[:60]!r})"))
        else:
            for number in range(start + 1, last):  # the lines wholly inside the record
                if a_row(_fields(lines[number - 1], delimiter), 0, width):
                    text = lines[number - 1].rstrip()[:60]
                    found.append((start, last, f"line {number} ({text!r})"))
                    break
    if found:
        start, last, which = found[0]
        more = f" ({len(found) - 1} more quoted fields look alike)" if len(found) > 1 else ""
        _note(path, start, f"a quoted field starts on this line and runs to line {last}, and "
                           f"{which} reads as a row of this file: a quote left open, merging "
                           f"rows? It is read as one text, as CSV says{more}. A quote that is "
                           f"part of the text must be doubled (\"\") inside a quoted field")


def _check_tsv_quoting(path, records) -> None:
    """TSV is read without quoting; note fields quoted as pandas and Excel write them (in quotes,
    inner quotes doubled), which arrive with those quotes as text. Not unquoted: a text may begin
    and end with a quote."""
    for line, _, row in records:
        for field in row:
            if len(field) > 2 and field[0] == field[-1] == '"' and '""' in field[1:-1]:
                _note(path, line, f"the field {field[:60]!r} looks quoted as CSV quotes it "
                                  f"(pandas' to_csv(sep='\\t'), Excel): TSV is read without "
                                  f"quoting, so its quotes stay in the text; write the file as "
                                  f"CSV or JSONL instead")
                return


def _read_jsonl(path: Path, text_column, label_column, num_labels, label_map, encoding,
                name) -> TextDataset:
    text = _read_text(path, encoding)
    rows = []
    # "\n" only: str.splitlines() also splits at U+2028, U+0085, form feeds, ... which JSON
    # strings may hold unescaped.
    for line, raw in enumerate(text.split("\n"), start=1):
        raw = raw[:-1] if raw.endswith("\r") else raw
        if not raw.strip():
            continue
        try:
            obj, twice = _json_object(raw)
        except json.JSONDecodeError as exc:
            raise DataFileError(path, f"invalid JSON: {exc.msg} (char {exc.pos})", line) from None
        except RecursionError:
            raise DataFileError(path, "invalid JSON: nested too deeply to read", line) from None
        except ValueError as exc:  # an integer over Python's digit limit, say
            reason = str(exc).split(";")[0]  # not the hint to call sys.set_int_max_str_digits
            raise DataFileError(path, f"invalid JSON: {reason}", line) from None
        if not isinstance(obj, dict):
            raise DataFileError(path, f"expected a JSON object, got {type(obj).__name__}", line)
        twice = [k for k in twice if k in (text_column, label_column)]  # others are unread
        if twice:
            raise DataFileError(path, f"the key {twice[0]!r} appears twice in this object "
                                      f"(JSON keeps the last silently)", line, twice[0])
        for col in (text_column, label_column):
            if col is not None and col not in obj:
                raise DataFileError(path, f"missing column {col!r} (keys: {sorted(obj)})", line, col)
        t = _check_text(path, line, text_column, obj[text_column])
        if label_column is None:
            rows.append((line, t, 0))
            continue
        y = obj[label_column]
        if y is None or isinstance(y, (list, dict)):
            raise DataFileError(path, f"label must be an integer or string, got {y!r}", line,
                                label_column)
        rows.append((line, t, _label_value(y, path, line, label_column, num_labels, label_map)))
    return _finish(path, rows, num_labels, name, text_column, label_column)


def _json_object(line: str):
    """``json.loads(line)`` and the keys its top-level object holds twice (JSON keeps the last)."""
    repeats = []  # per object, inner ones first: the top-level object is built last

    def hook(pairs):
        seen, twice = set(), []
        for key, _ in pairs:
            if key in seen:
                twice.append(key)
            seen.add(key)
        repeats.append(twice)
        return dict(pairs)

    obj = json.loads(line, object_pairs_hook=hook)
    return obj, (repeats[-1] if isinstance(obj, dict) else [])


def _same_but_case(name: str, names) -> list:
    """The entries of ``names`` equal to ``name`` when case is ignored."""
    return [k for k in names if str(k).lower() == name.lower()]


def _model_class_name(name: str, model_names) -> str | None:
    """The model's class name (a key of ``label_map``) that ``name`` is: the same, else the same
    but for case (the model says POSITIVE / Fresh where the data says positive / fresh, as
    ``purify_fast.commands.check_classes_match`` compares a named corpus's); None when none is,
    or when several differ from it only in case."""
    if name in model_names:
        return name
    same = _same_but_case(name, model_names)
    return same[0] if len(same) == 1 else None


def _names_in(label_map: dict) -> list:
    """The class names among ``label_map``'s keys, without the index spellings that
    ``purify_fast.commands._label_map`` adds (``"0" -> 0`` beside class 0's own name): a digit
    key is a name when it maps elsewhere than its own value ("1" -> 0 of yelp_polarity) or is
    its class's only key. Those spellings are no names: a ClassLabel named "1" of a dataset read
    for a rotten / fresh model is not class 1."""
    keys_of = {}
    for k, v in label_map.items():
        keys_of.setdefault(v, []).append(k)
    return [k for k, v in label_map.items()
            if not (_is_int_text(str(k)) and int(k) == v and len(keys_of[v]) > 1)]


def _read_hf(path: Path, text_column, label_column, num_labels, label_map, name,
             split: str | None) -> TextDataset:
    try:
        import datasets  # noqa: F401 - optional dependency, only for save_to_disk directories
    except ImportError:
        raise DataFileError(path, "is a directory (a Hugging Face save_to_disk dataset?) but the "
                                  "'datasets' package is not installed; fix: pip install datasets") from None
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise DataFileError(path, f"cannot load with datasets.load_from_disk: {exc}") from None
    if isinstance(ds, DatasetDict):
        if split is None and len(ds) > 1:
            # Taking "train" would be silently wrong for a clean set or a dev set.
            raise DataFileError(path, f"is a DatasetDict with the splits {', '.join(ds)}: pass "
                                      f"one split's directory ({path / next(iter(ds))}, as "
                                      f"save_to_disk wrote it), or split= in Python")
        split = split or next(iter(ds))
        if split not in ds:
            raise DataFileError(path, f"has no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    for col in (text_column, label_column):
        if col is not None and col not in ds.column_names:
            raise DataFileError(path, f"missing column {col!r} (columns: {ds.column_names})",
                                None, col)
    if label_column is None:
        rows = [(i, _check_text(path, i, text_column, t), 0)
                for i, t in enumerate(ds[text_column], start=1)]
        return _finish(path, rows, 2, name, text_column, label_column)
    names = None
    feat = ds.features.get(label_column)
    class_names = tuple(feat.names) if hasattr(feat, "names") else None
    if label_map is None and class_names:
        names = class_names
        num_labels = num_labels or len(names)
    # The stored integers index the dataset's own ClassLabel names; when the model names its
    # classes too, the names say which is which (the two orders may differ), digit names
    # included, as a file's labels are read.
    model_names = [] if label_map is None else _names_in(label_map)
    as_model = {}
    if model_names and class_names:
        found = {n: _model_class_name(n, model_names) for n in class_names}
        known = [n for n, k in found.items() if k is not None]
        if known and len(known) < len(class_names):
            raise DataFileError(path, f"the ClassLabel names of column {label_column!r} "
                                      f"({', '.join(class_names)}) are only partly the model's "
                                      f"classes ({', '.join(map(str, model_names))})", None,
                                label_column)
        if len({found[n] for n in known}) < len(known):  # Pos and POS: which one is pos?
            raise DataFileError(path, f"the ClassLabel names of column {label_column!r} "
                                      f"({', '.join(class_names)}) name one of the model's "
                                      f"classes ({', '.join(map(str, model_names))}) twice",
                                None, label_column)
        as_model = found if known else {}
    if model_names and class_names and not as_model:
        ours = ", ".join(f"{n}={i}" for i, n in enumerate(class_names))
        theirs = ", ".join(f"{k}={label_map[k]}" for k in sorted(model_names, key=label_map.get))
        print(f"note: {path}: the ClassLabel names of column {label_column!r} ({ours}) are taken "
              f"as the model's classes ({theirs}) by index", file=sys.stderr)
    rows = []
    # "line" for a saved dataset is the 1-based row number.
    for i, (t, y) in enumerate(zip(ds[text_column], ds[label_column]), start=1):
        t = _check_text(path, i, text_column, t)
        if as_model and isinstance(y, int) and 0 <= y < len(class_names):
            y = as_model[class_names[y]]
        elif class_names and isinstance(y, int):
            # an index into the ClassLabel names, taken by index: never looked up as a class
            # name (the model's class "1" is not index 1)
            rows.append((i, t, _label_value(y, path, i, label_column, num_labels, None)))
            continue
        rows.append((i, t, _label_value(y, path, i, label_column, num_labels, label_map)))
    out = _finish(path, rows, num_labels, name, text_column, label_column)
    if names and out.label_names is None:
        out = TextDataset(out.texts, out.labels, out.num_labels, out.name, names)
    return out


def load_text_file(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                   num_labels: int | None = None, label_map: dict | None = None,
                   format: str | None = None, encoding: str = "utf-8", name: str | None = None,
                   split: str | None = None) -> TextDataset:
    """Read labelled text from a CSV/TSV/JSONL file or a ``save_to_disk`` directory.

    ``num_labels`` defaults to ``max(label) + 1`` (at least 2); when given, labels outside
    ``[0, num_labels)`` are errors. ``split`` picks the split of a saved ``DatasetDict``.
    Labels are class indices (``1``, ``"1"``, ``1.0``) or class names, numbered in sorted order
    unless ``label_map`` gives their numbers; when its class names are numbers, a number that is
    none of them is refused (an index, or a name for another class?). ``label_column=None``
    reads unlabelled text (for MIMIC): every label is 0 and ``num_labels`` 2, placeholders
    nothing should score.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, "no such file or directory")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataFileError(path, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
    if fmt == "hf":
        if not path.is_dir():
            raise DataFileError(path, "format 'hf' needs a save_to_disk directory")
        return _read_hf(path, text_column, label_column, num_labels, label_map, name, split)
    if path.is_dir():
        raise DataFileError(path, f"is a directory, but format {fmt!r} needs a file")
    if fmt == "jsonl":
        return _read_jsonl(path, text_column, label_column, num_labels, label_map, encoding, name)
    return _read_delimited(path, "," if fmt == "csv" else "\t", text_column, label_column,
                           num_labels, label_map, encoding, name)
