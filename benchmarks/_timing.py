"""Shared helpers of the ratio benchmarks: interleaved timing of our path and its peer, and the machine line.

Both sides run in the same process, alternating call by call (ours, peer, ours, ...), so that load from other
processes on a shared machine hits both alike; each side gets ``warmup`` untimed calls, then ``iters`` timed
calls, and the median is reported. ``ratio`` is always "ours over peer" in throughput terms (peer time / our time
for the same work): above 1.0 we are faster.

Model FLOPs utilisation (MFU) = training FLOPs of one step / median step seconds / the device's dense peak; the peak
is ``--peak-tflops`` when given, else looked up by GPU name in :data:`PEAK_16BIT_TFLOPS`.
"""

import json
import logging
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

logger = logging.getLogger("benchmarks")
PEAK_16BIT_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense fp16/bf16 tensor-core peaks (SXM)
RESULTS: List[Dict[str, object]] = []  # every report() of this process, for drivers that run benchmarks in-process


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # open_clip and fairseq log through the root logger
    logger.setLevel(logging.INFO)


def machine() -> Dict[str, object]:
    """CPU model, core count, torch threads and the 1-minute load average (the shared-machine caveat)."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), model
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(ours: Callable[[], object], peer: Callable[[], object], warmup: int, iters: int) -> Dict[str, float]:
    """Median seconds per call of each side (alternating calls) and ``ratio = peer / ours``."""
    for _ in range(warmup):
        ours()
        peer()
    times = {"ours": [], "peer": []}
    for _ in range(iters):
        for name, fn in (("ours", ours), ("peer", peer)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["peer"])
    return {
        "ours_s": ours_s,
        "peer_s": peer_s,
        "ratio": peer_s / ours_s,
        "ours_spread": max(times["ours"]) / min(times["ours"]),
        "peer_spread": max(times["peer"]) / min(times["peer"]),
    }


def peak_tflops(device: str, given: Optional[float]) -> Optional[float]:
    """The dense 16-bit peak (TFLOP/s) MFU divides by: ``given`` (a flag), else the table entry of the GPU's name,
    else None (CPU, or an unknown GPU: no MFU)."""
    if given is not None:
        return given
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_16BIT_TFLOPS.items() if k in name), None)


def mfu(step_flops: float, step_seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s of a step over the peak (TFLOP/s)."""
    return step_flops / step_seconds / (peak * 1e12)


def report(name: str, results: Dict[str, object]) -> Dict[str, object]:
    """Log a human line per measurement and one machine-readable json line (``RESULT {...}``); the same payload is
    appended to :data:`RESULTS` and returned."""
    logger.info("%s on %s", name, machine())
    for key, value in results.items():
        if isinstance(value, dict) and "ours_s" in value:
            logger.info(
                "%-28s ours %.4f s  peer %.4f s  ratio %.3f", key, value["ours_s"], value["peer_s"], value["ratio"]
            )
    payload = json.loads(json.dumps({"benchmark": name, "machine": machine(), **results}, default=float))
    logger.info("RESULT %s", json.dumps(payload))
    RESULTS.append(payload)
    return payload
