"""Reading local text files (WikiText rows, JSON lines or lists, gzip, parquet) into documents,
each damaged file or row named in one line (`DataError`)."""

from __future__ import annotations

import gzip
import json
import zlib

from admm_prune.reference.errors import AdmmPruneError

ROW_SUFFIXES = (".txt", ".raw", ".tokens")  # WikiText raw layout: one row per line
LOCAL_SUFFIXES = (*ROW_SUFFIXES, ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


class DataError(AdmmPruneError):
    """Bad data input (missing or empty file, no text field, too little text); a user error."""


def read_file(path):
    """Texts of one local file; DataError naming `path` when there are none."""
    name = path.name
    if name.endswith(ROW_SUFFIXES):
        texts = _read_rows(path)
    elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        texts = _read_json(path)
    elif name.endswith(".parquet"):
        texts = _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)}")
    if not any(text.strip() for text in texts):
        raise DataError(f"{path}: holds no text")
    return texts


def _not_utf8(path, error):
    """DataError naming `path` and the byte offset of its first invalid UTF-8 sequence."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            f.read().decode("utf-8")
        except UnicodeDecodeError as exact:  # the streamed error's offset is within a chunk
            error = exact
        except (OSError, EOFError, zlib.error) as damaged:  # bad bytes from a damaged gzip stream
            return DataError(f"{path}: not a readable gzip file ({type(damaged).__name__}: {damaged})")
    where = ", uncompressed" if path.name.endswith(".gz") else ""
    line = error.object[:error.start].count(b"\n") + 1
    return DataError(f"{path}: not UTF-8 text: byte {error.start} (line {line}{where}) is "
                     f"{error.object[error.start:error.start + 1]!r} ({error.reason}); re-encode it as UTF-8")


def _read_rows(path):
    """Rows as the HF WikiText split gives them: each line with its newline, a blank line as ""."""
    try:
        with open(path, encoding="utf-8") as f:
            return [row if row.strip() else "" for row in f]
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


def _read_json(path):
    """Texts of a JSON-lines file (one object with a ``text`` field, or one string, per line) or of
    one JSON list; errors name the line of the file (records of a list: their index)."""
    content = _read_text(path)
    if content.lstrip().startswith("["):
        try:
            records = json.loads(content)  # the error's line and column are the file's
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not JSON lines or a JSON list ({error})") from None
        return [_text_field(path, f"record {i}", record) for i, record in enumerate(records)]
    texts = []
    for number, line in enumerate(content.split("\n"), start=1):  # not splitlines(): U+2028 is legal in JSON
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not JSON ({error.msg}: column {error.colno})") from None
        texts.append(_text_field(path, f"line {number}", record))
    return texts


def _read_text(path):
    """The whole file as text, gunzipped for ``.gz``; DataError for bad UTF-8 or a damaged gzip."""
    gz = path.name.endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        if not gz:
            raise
        raise DataError(f"{path}: not a readable gzip file ({type(error).__name__}: {error})") from None


def _text_field(path, where, record):
    text = record.get("text") if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise DataError(f"{path}: {where} has no string 'text' field")
    return text


def _read_parquet(path):
    """The ``text`` column; DataError naming the file for a damaged file, and the row for a null
    or non-string value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if "text" not in pq.read_schema(path).names:
            raise DataError(f"{path}: no 'text' column")
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as error:  # ArrowIOError is both
        message = " ".join(str(error).split())
        raise DataError(f"{path}: not a readable parquet file ({type(error).__name__}: {message})") from None
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            what = "null" if text is None else f"of type {type(text).__name__}"
            raise DataError(f"{path}: row {row} (counting from 0) of column 'text' is {what}, not a string")
    return texts
