"""Reading a user-supplied ``.pt`` / ``.bin`` without running code from it: the bottom of the checkpoint stack.

``torch.load(path, weights_only=False)`` unpickles whatever the file holds, and unpickling may call any function
the file names: a crafted ``.pt`` runs code as it loads. :func:`load_checkpoint_file` uses torch's restricted
unpickler (``weights_only=True``), which builds tensors, numbers, strings, lists, tuples, dicts and OrderedDicts,
plus the classes of :data:`SAFE_GLOBALS`, and refuses a file that needs another global with
:class:`UnsafeCheckpointError`, naming the file and the globals, before anything in it has run.

It imports only torch, so that ``modules/`` and ``models/`` (released COSA / BERT weights), the trainer and the
sharded backend read files through it without importing :mod:`unilm_vl.checkpoint`, which builds models and tasks
(see that module for the fairseq checkpoint and HF-directory levels).
"""

import argparse
import os
import pickle
import re
import zipfile
from typing import Any, List

import torch

SAFE_GLOBALS = (argparse.Namespace,)
"""Classes allowed on top of torch's weights-only defaults: fairseq's legacy ``state["args"]``."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that names globals the weights-only unpickler does not build (it could run code)."""


def _unsafe_globals(path: str, message: str) -> List[str]:
    """Every global of ``path`` that is not allowed (zip checkpoints: all of them; legacy files: the first one,
    from torch's ``message``)."""
    if zipfile.is_zipfile(path):
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if found:
                return list(found)
        except Exception:  # only the complete list is lost: torch's message below names the first global
            pass
    return re.findall(r"Unsupported global: GLOBAL (\S+)", message)


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a user-supplied file that runs no code from it (see the module docstring).

    Raises ``FileNotFoundError`` naming a missing ``path``, :class:`UnsafeCheckpointError` (a ``ValueError``)
    naming the file and the globals it would need, and ``ValueError`` for a file torch cannot read at all."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path, str(exc))
        if names:
            raise UnsafeCheckpointError(
                f"{path}: refused: it needs the global(s) {', '.join(names)}, which loading without running code "
                "(torch.load weights_only=True) does not build; checkpoints written by unilm_vl or fairseq-train "
                "never need them"
            ) from None
        reason = re.search(r"WeightsUnpickler error: (.*)", str(exc))
        raise ValueError(
            f"{path}: not a readable torch checkpoint: {reason.group(1) if reason else type(exc).__name__}"
        ) from exc
    except Exception as exc:  # a truncated or foreign file fails in many ways; each is reported, chained
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
