"""Shared fixtures: tiny image-caption shards written to tmp_path, and paths of the installed tools; the settings
for parallel runs (``pytest -n 2``, pytest-xdist, as tests/run.sh runs them)."""

import base64
import io
import os
import random
import sys

import pytest
from PIL import Image

from unilm_vl.data.formats import GRIT_TSV, TsvShardWriter, WdsShardWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
BIN = os.path.dirname(sys.executable)
# The Kosmos-2 release dictionary ids of the GRIT README record's grounded caption (noun chunks of two boxes, 32 x 32
# grid), tokenised by the release files in SHARED (tests/test_kosmos2_grounding.py, tests/test_kosmos2_samples.py).
GRIT_README_IDS = [
    64012,
    64007,
    10,
    6454,
    31772,
    64008,
    64009,
    64013,
    65036,
    64010,
    23,
    64007,
    10,
    1287,
    1285,
    64008,
    64009,
    64301,
    65004,
    64010,
    14,
    6372,
    46,
    689,
    84,
    1158,
    2,
]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def jpeg_bytes(colour, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def captions(n, seed=0):
    rng = random.Random(seed)
    names = list(COLOURS)
    return [rng.choice(names) for _ in range(n)]


def write_wds(prefix, n, per_shard, seed=0):
    """n samples keyed 000000.. with caption 'a <colour> picture'; returns the keys."""
    keys = []
    with WdsShardWriter(prefix, samples_per_shard=per_shard) as writer:
        for i, colour in enumerate(captions(n, seed)):
            key = f"{i:06d}"
            writer.write(key, jpeg_bytes(COLOURS[colour]), "jpg", f"a {colour} picture", {"key": key})
            keys.append(key)
    return keys


def tsv_row(i, colour, image_bytes=None):
    data = image_bytes if image_bytes is not None else jpeg_bytes(COLOURS[colour])
    return {
        "id": f"{i:06d}",
        "caption": f"a {colour} picture",
        "image": base64.b64encode(data).decode(),
        "width": 40,
        "height": 32,
        "annotation": {"phrase": [], "expression_v1": []},
    }


def write_tsv(prefix, n, per_shard, seed=0):
    with TsvShardWriter(prefix, GRIT_TSV, rows_per_shard=per_shard) as writer:
        for i, colour in enumerate(captions(n, seed)):
            writer.write(tsv_row(i, colour))
    return [f"{i:06d}" for i in range(n)]


def pytest_configure(config):
    """Under pytest-xdist each worker is one of several processes sharing the cores: one intra-op thread per worker
    (and per subprocess it starts) instead of every process spinning a thread per core against the others."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"


def pytest_sessionstart(session):
    """Each process that runs tests starts its fork server with the harness imported (see
    :func:`two_ranks.start_forkserver`); an xdist controller runs none."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(session.config.option, "numprocesses", None):
        from two_ranks import start_forkserver

        start_forkserver()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (tests/run.sh: ``--dist loadfile --no-loadscope-reorder``, a module's tests on one worker,
    so a module-scoped fixture is built once) the modules holding a test marked ``slow`` are handed out first, so
    that a long module does not start last while the other worker idles. Stable sort: each module's tests stay
    together and in their order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts its identical collection identically
        slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
        items.sort(key=lambda item: item.path not in slow)


@pytest.fixture
def wds_dir(tmp_path):
    write_wds(str(tmp_path / "wds" / "part"), 60, 15)
    return tmp_path / "wds"
