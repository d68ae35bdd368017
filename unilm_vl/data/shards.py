"""Shard listing: brace expansion, globs, ``::``-separated lists, and sample counts.

``expand_urls("a/part-{00000..00009}.tar::b/*.tsv")`` returns the sorted concrete paths. A pattern that matches
nothing raises ``FileNotFoundError`` naming it, so a typo never trains on an empty set.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Dict, List, Optional, Sequence

import braceexpand

from .jsonio import read_json

logger = logging.getLogger(__name__)


def expand_urls(spec: str | Sequence[str], base_dir: Optional[str] = None) -> List[str]:
    """Expand ``{a..b}`` ranges, ``{x,y}`` alternatives and globs; ``::`` separates patterns.

    Relative paths are taken relative to ``base_dir`` when given. Order is kept per pattern (brace order);
    glob matches are sorted.
    """
    patterns = spec.split("::") if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern:
            continue
        for path in braceexpand.braceexpand(pattern):
            if base_dir is not None and not os.path.isabs(path):
                path = os.path.join(base_dir, path)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no file matches {path!r} (from {pattern!r})")
                out.extend(matches)
            else:
                if not os.path.exists(path):
                    raise FileNotFoundError(f"shard not found: {path} (from {pattern!r})")
                out.append(path)
    if not out:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return out


def _sizes_from_json(path: str) -> Optional[int]:
    """Sample count of ``path`` from ``sizes.json`` (open_clip) or img2dataset ``<shard>_stats.json``."""
    directory, name = os.path.split(path)
    sizes_file = os.path.join(directory, "sizes.json")
    if os.path.exists(sizes_file):
        sizes: Dict[str, int] = read_json(sizes_file, "shard sizes")
        if name in sizes:
            return int(sizes[name])
    stats = os.path.join(directory, os.path.splitext(name)[0] + "_stats.json")
    if os.path.exists(stats):
        return int(read_json(stats, "img2dataset stats").get("successes", 0))
    return None


def count_samples(paths: Sequence[str], counter) -> int:
    """Total samples over ``paths``: declared sizes where present, else ``counter(path)`` (a scan), logged."""
    total = 0
    scanned = 0
    for path in paths:
        n = _sizes_from_json(path)
        if n is None:
            n = counter(path)
            scanned += 1
        total += n
    if scanned:
        logger.info("counted samples of %d shards by scanning (add sizes.json to skip this)", scanned)
    return total
