"""Reading JSON: one reader for whole files, one parser for JSON text, one error type.

:func:`read_json` reads a whole file (annotations, data configs, ``sizes.json``, predictions, HF configs ...);
:func:`parse_json` parses one piece of JSON text (a webdataset ``.json`` member, a ``.jsonl`` line, an annotation
cell). Both raise :class:`JsonError` (a ``ValueError``) with a one-line message that names the file or place and
the problem:

* a missing file: :class:`JsonFileNotFoundError`, also a ``FileNotFoundError``;
* a file that cannot be read (a directory, no permission): its ``strerror``;
* bytes that are not UTF-8;
* invalid JSON, with the line and column (``json.JSONDecodeError``'s own text);
* an integer with more digits than Python converts (``sys.get_int_max_str_digits()``, 4300 by default);
* nesting deeper than the parser's recursion allows (``RecursionError``).

Python's ``json`` accepts ``NaN`` and ``Infinity``; so do these functions (callers check values they rely on).
Callers that treat bad input as a counted skip (the data streams) catch :class:`JsonError`; command-line tools let it
reach their one ``error:`` line (they catch ``ValueError``).
"""

import json
from typing import Any, Union


class JsonError(ValueError):
    """JSON text or a JSON file that cannot be read or parsed. ``str()`` is one line ``"<where>: <problem>"``;
    both parts are attributes (a data stream counts ``problem`` without the place)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem

    def __reduce__(self):  # keep both parts when a loader worker sends it to the main process
        return type(self), (self.where, self.problem)


class JsonFileNotFoundError(JsonError, FileNotFoundError):
    """:func:`read_json` of a path that does not exist (also a ``FileNotFoundError``)."""


def _problem(err: BaseException) -> str:
    """One line describing why JSON text could not be parsed."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
    if isinstance(err, RecursionError):
        return "not valid JSON: nested too deeply for the parser"
    return f"not valid JSON: {err}"  # JSONDecodeError names line and column; the int limit names its digit count


def parse_json(text: Union[str, bytes], where: str = "json") -> Any:
    """The value of JSON ``text`` (``bytes`` are decoded as UTF-8). Raises :class:`JsonError`
    ``"<where>: <problem>"``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError, a too long integer
        raise JsonError(where, _problem(err)) from None


def read_json(path: str, what: str = "json") -> Any:
    """The value of the UTF-8 JSON file ``path``; ``what`` names its role in errors (``"annotation"``,
    ``"data config"`` ...). Raises :class:`JsonError` ``"<what> file <path>: <problem>"``
    (:class:`JsonFileNotFoundError` when ``path`` does not exist)."""
    where = f"{what} file {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise JsonFileNotFoundError(where, "not found") from None
    except UnicodeDecodeError as err:
        raise JsonError(where, _problem(err)) from None
    except OSError as err:  # a directory, no permission, an I/O error
        raise JsonError(where, f"cannot be read: {err.strerror or err}") from None
    return parse_json(text, where)
