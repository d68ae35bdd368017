"""How every ``python -m unilm_vl.*`` command ends a user mistake: one ``error:`` line on stderr, exit status 2.

The commands' ``main`` functions raise; :func:`run_cli` (called from each ``if __name__ == "__main__":`` block and
console script) decides what a user mistake is and prints it, so Python callers of ``main`` keep the exception and
the command line gets one line instead of a stack trace. A user mistake is

* an ``OSError`` that names a path: a missing checkpoint, data file, image root or output directory
  (``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``, ``FileExistsError``, ``PermissionError``);
* an exception type defined in this package (``VocabularyMismatchError``, ``UnsafeCheckpointError``,
  ``ShardingError``, ``JsonError``, ``ConversionError``, ...: all ``ValueError`` subclasses);
* a plain ``ValueError`` raised by this package's own code (its input checks, which say what to pass instead).

Anything else (a ``ValueError`` from inside torch, a ``RuntimeError``, a ``KeyError``) is a bug: it keeps its
traceback. ``LOGLEVEL=DEBUG`` also logs the traceback of a user mistake. argparse usage errors already print
``error:`` and exit 2 by themselves; ``SystemExit`` passes through untouched.

Floor 0 (tests/test_layering.py): the data tools use it, so it imports nothing from the package."""

import logging
import os
import sys
from typing import Any, Callable, Iterable, Optional, Sequence, Union

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
_PACKAGE = __name__.split(".")[0]
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _raised_by_package(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is a file of this package (a deliberate check)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def is_user_error(exc: BaseException) -> bool:
    """The rule of the module docstring."""
    if isinstance(exc, PATH_ERRORS):
        return True
    if not isinstance(exc, ValueError):
        return False
    return type(exc).__module__.split(".")[0] == _PACKAGE or _raised_by_package(exc)


def error_message(exc: BaseException) -> str:
    """The text after ``error:``: one line. An ``OSError`` raised by Python itself (``open``) carries the path in
    ``filename``; its ``str`` is "[Errno 2] No such file or directory: 'x'", which is turned into "x: no such file
    or directory"."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror[0].lower()}{exc.strerror[1:]}"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:  # str(KeyError('x')) is "'x'"
            text = str(exc.args[0])
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def report_error(error: Union[BaseException, str]) -> int:
    """Print ``error: <message>`` (one line) to stderr and return 2, for a ``main`` that catches its own errors
    and returns its exit status."""
    sys.stdout.flush()
    message = error_message(error) if isinstance(error, BaseException) else " ".join(str(error).split("\n"))
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run_cli(main: Callable[..., Any], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)`` (``main()`` when ``argv`` is None, so argument-less console-script functions fit) and
    return the process exit status: ``main``'s own when it returns an int, else 0; a user mistake prints
    ``error: ...`` to stderr and returns 2. Used as ``sys.exit(run_cli(main))``."""
    try:
        result = main() if argv is None else main(argv)
    except Exception as exc:  # noqa: BLE001 - anything not a user mistake is raised again below
        if not is_user_error(exc):
            raise
        logger.debug("user error", exc_info=True)
        return report_error(exc)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "batch") -> Iterable:
    """``iterable`` with a tqdm progress bar on stderr, for the long loops of the eval and data commands (encoding,
    generation, shard writing). Shown when stderr is a terminal (tqdm's ``disable=None``): logs redirected to a file
    and CI output stay free of bar redraws. ``UNILM_VL_PROGRESS=1`` forces the bar on, ``=0`` off."""
    from tqdm import tqdm

    forced = os.environ.get("UNILM_VL_PROGRESS")
    disable = None if forced is None else forced.strip() in ("0", "", "false", "no")
    return tqdm(
        iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True, file=sys.stderr
    )
