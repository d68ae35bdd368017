"""One prepared check of a GPU machine (``benchmarks/gpu_check.sh``): every training family under each precision and
FSDP2, the step / generation / data-pipeline ratio benchmarks against their peers, one JSON and one markdown table.

Steps (one row each in ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``):

* ``setup``: the data every later step reads, under ``OUT/data``: a synthetic world
  (:func:`unilm_vl.data.synthetic.generate_world`) with its sentencepiece vocabulary (Kosmos-2), a WordPiece
  ``vocab.txt`` (COSA), random ``unilm-vl-clip-tiny`` weights for ``--pretrained`` (FSC-CLIP LoRA), and the world's
  training split cut into smaller shards for the data-pipeline benchmark (open_clip's loader needs at least one
  shard per loader worker).
* ``train/<family>/<variant>``: fairseq's training step (:class:`unilm_vl.trainer.UnilmTrainer`, what
  ``python -m unilm_vl.train`` builds) of a tiny model of each family (clip, byolip, fsc_clip_lora, cosmos, kosmos2,
  cosa) under fp32, ``--fp16``, ``--memory-efficient-fp16``, ``--amp``, ``--bf16-autocast`` and ``--fsdp2
  --fsdp2-precision bf16`` (FSDP2 over a 1-rank group), repeating ONE batch for ``--train-updates`` updates with
  Adam: the losses must be finite and fall (a batch seen again is fitted better). The first loss of each variant is
  compared with the fp32 run's (same weights, same batch). fp16 updates that overflow are skipped by fairseq's loss
  scaler; they are counted, not failures.
* ``clip_vit_b16``: ``clip_step.py`` (our fairseq step vs open_clip's loop, ViT-B/16, fp16 autocast, MFU).
* ``kosmos2_base`` / ``kosmos2_xl``: ``kosmos2_step.py`` (training step and greedy tokens/s vs HF transformers'
  Kosmos-2 with the same weights, bf16 autocast, MFU).
* ``data_workers<N>``: ``data_pipeline.py`` (our webdataset and TSV loaders vs open_clip's webdataset pipeline,
  samples/s) with N loader workers.

Each step runs in a worker process (``gpu_check.py --worker``, started fresh by this driver) and has a time box:
a step that passes its box, or kills its worker, is recorded as ``timeout`` / ``crashed`` with the tail of the
worker's log, and the next step starts in a new worker; a step that raises is recorded as ``error`` with the
exception text (the worker then exits, so a broken CUDA context cannot leak into the next step). Steps of one
``group`` share a worker while they succeed (one import of torch/fairseq for all of them). A total budget
(``--budget-s``) caps the run: a step's box never reaches past it, and steps left when it is spent are ``skipped``.
The JSON and the table are rewritten after every step, so an interrupted run leaves what it measured.

``--smoke`` runs the same kinds of steps at tiny shapes on CPU, all in one worker: each family once with the
variants spread over the families so that every variant runs once (:data:`SMOKE_PAIRS`), the benchmarks at tiny
shapes (``kosmos2_xl`` in fp32, ``kosmos2_base`` in bf16), one data step with 2 loader workers, and MFU against a
nominal 1 TFLOP/s peak (meaningless, but computed). The test suite runs it (tests/test_gpu_check.py).

    bash scripts/install.sh && bash benchmarks/gpu_check.sh --out "$OUT"      # one GPU, at most --budget-s 450
    bash benchmarks/gpu_check.sh --smoke --out /tmp/gpu_check_smoke           # CPU, about a minute

MFU = training FLOPs of one step (torch ``FlopCounterMode`` on one forward: x3 for trained parts, x1 for Kosmos-2's
frozen image tower) / median step seconds / ``--peak-tflops`` (default 989: the dense bf16/fp16 peak of an
H100/H200 SXM).
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

FAMILIES = ["clip", "byolip", "fsc_clip_lora", "cosmos", "kosmos2", "cosa"]
VARIANTS: Dict[str, List[str]] = {  # fairseq-train flags of each precision / sharding variant
    "fp32": [],
    "fp16": ["--fp16"],
    "memory_efficient_fp16": ["--memory-efficient-fp16"],
    "amp": ["--amp"],
    "bf16": ["--bf16-autocast"],
    "fsdp2_bf16": ["--fsdp2", "--fsdp2-precision", "bf16"],
}
STATUSES = ("ok", "error", "timeout", "crashed", "skipped")
MFU_TARGET = 0.40  # Kosmos-2 xl, bf16 (the target)
NOMINAL_CPU_PEAK_TFLOPS = 1.0  # --smoke: exercises the MFU arithmetic; the number means nothing


# ================================================================================================ the plan
def step(name: str, kind: str, group: str, timeout_s: float, needs: Sequence[str] = (), **params: Any) -> dict:
    """One planned step: ``kind`` picks its runner, ``group`` the worker it may share, ``timeout_s`` its time box,
    ``needs`` the steps that must have succeeded before it, ``params`` its arguments."""
    return {
        "name": name,
        "kind": kind,
        "group": group,
        "timeout_s": float(timeout_s),
        "needs": list(needs),
        "params": params,
    }


# --smoke trains each family once and runs each variant once; the pairing puts the variants that are slow on a CPU
# (fp16 arithmetic, autocast) on the cheaper models (about 20 s in all on 2 cores instead of about 55 s).
SMOKE_PAIRS = [
    ("clip", "fp16"),
    ("byolip", "amp"),
    ("fsc_clip_lora", "memory_efficient_fp16"),
    ("cosmos", "bf16"),
    ("kosmos2", "fsdp2_bf16"),
    ("cosa", "fp32"),
]


def build_plan(args) -> List[dict]:
    """The steps of this run, in order (module docstring). ``args``: the parsed command line."""
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    peak = NOMINAL_CPU_PEAK_TFLOPS if smoke else args.peak_tflops
    one = "all" if smoke else None  # --smoke: one worker for everything (one interpreter start on 2 CPU cores)
    plan = [
        step(
            "setup",
            "setup",
            one or "setup",
            120 if smoke else 240,
            world_samples=64 if smoke else 4000,
            bench_shards=4 if smoke else 32,
            generate_workers=1 if smoke else min(16, os.cpu_count() or 1),
        )
    ]
    pairs = (
        [(f, v) for f, v in SMOKE_PAIRS if f in args.families and v in args.variants]
        if smoke
        else [(f, v) for f in args.families for v in args.variants]
    )
    for family, variant in pairs:
        plan.append(
            step(
                f"train/{family}/{variant}",
                "train",
                one or "train",
                60 if smoke else 45,
                ["setup"],
                family=family,
                variant=variant,
                updates=args.train_updates or (3 if smoke else 8),
                batch_size=4 if smoke else 32,
                cpu=smoke,
            )
        )
    common = ["--device", device, "--peak-tflops", str(peak)]
    if smoke:  # kosmos2_xl in fp32: bf16 matmuls are ~10x slower on CPUs without bf16 units; kosmos2_base is bf16
        clip = ["--model", "unilm-vl-clip-tiny", "--batch-size", "4", "--warmup", "1", "--iters", "1"]
        tiny = [
            "--arch",
            "bench",
            "--batch-size",
            "1",
            "--text-len",
            "4",
            "--new-tokens",
            "2",
            "--warmup",
            "1",
            "--iters",
            "1",
        ]
        k2 = {"base": [*tiny, "--precision", "bf16"], "xl": [*tiny, "--precision", "fp32"]}
    else:
        clip = ["--model", "ViT-B-16", "--batch-size", "256", "--warmup", "5", "--iters", "20"]
        k2 = {
            "base": [
                "--arch",
                "base",
                "--batch-size",
                "16",
                "--text-len",
                "128",
                "--warmup",
                "3",
                "--iters",
                "10",
                "--precision",
                "bf16",
            ],
            "xl": [
                "--arch",
                "xl",
                "--batch-size",
                "8",
                "--text-len",
                "128",
                "--warmup",
                "3",
                "--iters",
                "10",
                "--precision",
                "bf16",
            ],
        }
    plan.append(
        step(
            "clip_vit_b16",
            "clip_step",
            one or "bench",
            90 if smoke else 120,
            argv=[*clip, "--precision", "fp16", *common],
        )
    )
    for size in ("base", "xl"):
        plan.append(
            step(
                f"kosmos2_{size}",
                "kosmos2_step",
                one or "bench",
                90 if smoke else {"base": 120, "xl": 240}[size],
                argv=[*k2[size], *common],
            )
        )
    for workers in args.data_workers:
        passes = ["--batch-size", "8", "--warmup", "0", "--iters", "1"] if smoke else ["--warmup", "1", "--iters", "2"]
        plan.append(
            step(
                f"data_workers{workers}",
                "data_pipeline",
                one or "data",
                90 if smoke else 120,
                ["setup"],
                argv=["--workers", str(workers), *passes],
            )
        )
    return plan


# ================================================================================================ result maths
def loss_flags(losses: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Verdict on the per-update losses of one run (``None``: an update fairseq skipped after an fp16 overflow):
    ``finite``: at least one update ran and every loss is finite; ``falling``: the mean of the last third (at least
    one) of the losses lies below the first loss."""
    ran = [x for x in losses if x is not None]
    finite = bool(ran) and all(math.isfinite(x) for x in ran)
    tail = ran[-max(1, len(ran) // 3) :] if ran else []
    falling = finite and len(ran) >= 2 and statistics.mean(tail) < ran[0]
    return {
        "finite": finite,
        "falling": bool(falling),
        "skipped_updates": len(losses) - len(ran),
        "first_loss": ran[0] if ran else None,
        "last_loss": ran[-1] if ran else None,
    }


def compare_to_fp32(steps: Sequence[dict]) -> None:
    """Add ``first_loss_rel_diff_vs_fp32`` to every other ok train step of a family with an ok fp32 run (in place):
    |first loss - fp32's first loss| / |fp32's| (same initial weights, same batch: only precision differs)."""
    ref = {
        s["params"]["family"]: s["result"]["first_loss"]
        for s in steps
        if s["kind"] == "train"
        and s["status"] == "ok"
        and s["params"]["variant"] == "fp32"
        and s["result"].get("first_loss") is not None
    }
    for s in steps:
        if (
            s["kind"] != "train"
            or s["status"] != "ok"
            or s["params"]["family"] not in ref
            or s["params"]["variant"] == "fp32"
        ):
            continue
        first, base = s["result"].get("first_loss"), ref[s["params"]["family"]]
        if first is not None and base:
            s["result"]["first_loss_rel_diff_vs_fp32"] = abs(first - base) / abs(base)


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary(s: dict) -> str:
    """One table cell describing a finished step's result."""
    r = s.get("result") or {}
    if s["status"] != "ok":
        return first_line(s.get("error") or "")
    if s["kind"] == "setup":
        return (
            f"world {r.get('world_samples')} samples, {r.get('bench_shards')} benchmark shards; "
            f"{r.get('machine', {}).get('device', '')}"
        )
    if s["kind"] == "train":
        losses = " ".join("skip" if x is None else f"{x:.3f}" for x in r["losses"])
        text = (
            f"loss {losses}; finite {'yes' if r['finite'] else 'NO'}, falling {'yes' if r['falling'] else 'no'}"
            f"; {r['update_s_median'] * 1000:.0f} ms/update"
        )
        if "first_loss_rel_diff_vs_fp32" in r:
            text += f"; first loss vs fp32 {r['first_loss_rel_diff_vs_fp32']:.1e}"
        return text
    if s["kind"] == "clip_step":
        t = r["train_step"]
        return (
            f"ratio {t['ratio']:.3f} (ours {t['ours_s'] * 1000:.1f} ms, open_clip {t['peer_s'] * 1000:.1f} ms per "
            f"step of {r['config']['batch_size']}); MFU ours {_pct(r.get('mfu_ours'))}, open_clip "
            f"{_pct(r.get('mfu_peer'))} of {r.get('peak_tflops')} TFLOP/s"
        )
    if s["kind"] == "kosmos2_step":
        t, g, tps = r["train_step"], r.get("greedy_generation"), r.get("tokens_per_s", {})
        text = (
            f"{r['config']['arch']}: step ratio {t['ratio']:.3f} (ours {t['ours_s'] * 1000:.1f} ms, HF "
            f"{t['peer_s'] * 1000:.1f} ms); MFU ours {_pct(r.get('mfu_ours'))}, HF {_pct(r.get('mfu_peer'))} of "
            f"{r.get('peak_tflops')} TFLOP/s"
        )
        if g:
            text += (
                f"; greedy ratio {g['ratio']:.3f} (ours {tps['ours']:.0f}, HF {tps['peer']:.0f} tokens/s, "
                f"{100 * r['greedy_rows_identical']:.0f}% rows identical)"
            )
        return text
    if s["kind"] == "data_pipeline":
        parts = []
        for key, label in (("wds_vs_open_clip", "wds"), ("tsv_vs_open_clip", "tsv")):
            d = r[key]
            parts.append(
                f"{label} ratio {d['ratio']:.3f} (ours {d['ours_samples_per_s']:.0f}, open_clip "
                f"{d['peer_samples_per_s']:.0f} samples/s)"
            )
        return f"{r['config']['workers']} workers: " + "; ".join(parts)
    return ""


def first_line(text: str, limit: int = 160) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    line = lines[0] if lines else ""
    return (line[: limit - 3] + "...") if len(line) > limit else line


def machine_line(m: Optional[dict]) -> str:
    if not m:
        return "unknown (setup did not run)"
    return f"{m.get('device')}; {m.get('cores')} CPU cores, 1-min load {m.get('load_avg_1m')}; torch {m.get('torch')}"


def markdown(report: dict) -> str:
    """The table of a report (one row per planned step, in plan order), then the full error of every failed step."""
    smoke = report["mode"] == "smoke"
    counts = ", ".join(f"{n} {k}" for k, n in report["counts"].items() if n)
    lines = [
        f"# gpu_check ({report['mode']}{': tiny shapes on CPU, timings and MFU meaningless' if smoke else ''})",
        "",
        f"Machine: {machine_line(report.get('machine'))}  ",
        f"Total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget; peak for MFU "
        f"{report['peak_tflops']} TFLOP/s; {counts}",
        "",
        "| step | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for s in report["steps"]:
        cell = summary(s).replace("|", "/")
        seconds = "" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        lines.append(f"| {s['name']} | {s['status']} | {seconds} | {cell} |")
    xl = next((s for s in report["steps"] if s["name"] == "kosmos2_xl" and s["status"] == "ok"), None)
    if xl is not None and not smoke:
        value = xl["result"].get("mfu_ours")
        verdict = "n/a" if value is None else ("met" if value >= MFU_TARGET else "missed")
        lines += ["", f"Kosmos-2 xl bf16 MFU (ours): {_pct(value)}, target >= {100 * MFU_TARGET:.0f}%: {verdict}"]
    failed = [s for s in report["steps"] if s["status"] not in ("ok", "skipped") and s.get("error")]
    if failed:
        lines += ["", "## Failures", ""]
        for s in failed:
            lines += [f"### {s['name']} ({s['status']})", "", "```", s["error"].strip()[-3000:], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# ================================================================================================ the driver
class Events:
    """The worker -> driver protocol: one JSON object per line, appended and flushed (``ready``, ``start``,
    ``end``); the driver reads the lines added since its last read."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0

    def emit(self, **event: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"t": time.time(), **event}, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_new(self) -> List[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def log_tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - chars))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Runner:
    """Runs a plan's steps in worker processes with per-step time boxes and a total budget (module docstring).
    ``worker_cmd``: the command line of a worker, without its ``--plan/--steps/--events`` arguments."""

    def __init__(
        self,
        plan: List[dict],
        out_dir: str,
        worker_cmd: List[str],
        budget_s: float,
        startup_timeout_s: float = 180.0,
        poll_s: float = 0.2,
        env: Optional[dict] = None,
        on_step=None,
    ):
        self.plan, self.out_dir, self.worker_cmd = plan, out_dir, worker_cmd
        self.budget_s, self.startup_timeout_s, self.poll_s, self.env = budget_s, startup_timeout_s, poll_s, env
        self.on_step = on_step  # called with (steps recorded so far, the new record) after each record
        self.records: Dict[int, dict] = {}
        self.launches = 0
        self.active: Optional[subprocess.Popen] = None  # the running worker
        self.start = time.monotonic()
        os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
        self.plan_path = os.path.join(out_dir, "logs", "plan.json")
        with open(self.plan_path, "w", encoding="utf-8") as fh:
            json.dump(plan, fh, indent=1)

    # ---- records
    def record(
        self,
        index: int,
        status: str,
        seconds: Optional[float] = None,
        result: Optional[dict] = None,
        error: Optional[str] = None,
    ) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.records[index] = {
            **self.plan[index],
            "status": status,
            "seconds": seconds,
            "result": result or {},
            "error": error,
        }
        if self.on_step is not None:
            self.on_step(self.steps(), self.records[index])

    def steps(self) -> List[dict]:
        return [self.records[i] for i in sorted(self.records)]

    def kill_active(self) -> None:
        """Kill the running worker's process group (the worker and its data-loader processes)."""
        proc, self.active = self.active, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def left(self) -> float:
        """Seconds left of the total budget."""
        return self.budget_s - (time.monotonic() - self.start)

    def blocked(self, index: int) -> Optional[str]:
        """Why step ``index`` cannot run: a step it needs has a record other than ok (not yet run is fine: it
        comes earlier in the plan)."""
        for need in self.plan[index]["needs"]:
            done = [r for r in self.records.values() if r["name"] == need]
            if done and done[0]["status"] != "ok":
                return f"skipped: needs step {need!r}, which ended {done[0]['status']}"
        return None

    # ---- running
    def run(self) -> List[dict]:
        self.start = time.monotonic()
        first = 0
        while first < len(self.plan):
            last = first
            while last + 1 < len(self.plan) and self.plan[last + 1]["group"] == self.plan[first]["group"]:
                last += 1
            self._run_group(range(first, last + 1))
            first = last + 1
        return self.steps()

    def _run_group(self, indices: range) -> None:
        while True:
            todo = []
            for j in indices:
                if j in self.records:
                    continue
                reason = self.blocked(j)
                if reason:
                    self.record(j, "skipped", error=reason)
                else:
                    todo.append(j)
            if not todo:
                return
            if self.left() <= 1.0:
                for j in todo:
                    self.record(j, "skipped", error="skipped: the total time budget (--budget-s) was spent")
                return
            self._launch(todo)

    def _launch(self, todo: List[int]) -> None:
        """One worker for the steps ``todo``; every step it ends is recorded, a step it does not end in time (or
        dies in) is recorded as timeout / crashed, and the caller starts a new worker for the rest."""
        self.launches += 1
        tag = f"{self.launches:02d}-{self.plan[todo[0]]['name'].replace('/', '_')}"
        events = Events(os.path.join(self.out_dir, "logs", f"events-{tag}.jsonl"))
        log = os.path.join(self.out_dir, "logs", f"worker-{tag}.log")
        cmd = [*self.worker_cmd, "--plan", self.plan_path, "--steps", ",".join(map(str, todo)), "--events", events.path]
        recorded_before = len(self.records)
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=self.env, start_new_session=True
            )  # own process group: killed with its loader workers
        self.active = proc
        launched = time.monotonic()
        state = {"current": None, "started": None, "ready": False}

        def handle(new_events):
            for ev in new_events:
                if ev["event"] == "ready":
                    state["ready"] = True
                elif ev["event"] == "start":
                    state["current"], state["started"] = ev["index"], time.monotonic()
                elif ev["event"] == "end":
                    error = ev.get("error")
                    if error:
                        error += f"\n(worker log: {os.path.relpath(log, self.out_dir)})"
                    self.record(ev["index"], ev["status"], ev.get("seconds"), ev.get("result"), error)
                    state["current"] = None

        kill = self.kill_active
        while True:
            handle(events.read_new())
            if proc.poll() is not None:
                handle(events.read_new())  # lines written just before it exited
                break
            now, current = time.monotonic(), state["current"]
            if current is not None:
                elapsed, box = now - state["started"], self.plan[current]["timeout_s"]
                if elapsed > box or self.left() <= 0:
                    kill()
                    why = f"its time box of {box:.0f} s" if elapsed > box else "the total budget (--budget-s)"
                    self.record(
                        current,
                        "timeout",
                        elapsed,
                        error=f"timed out after {elapsed:.0f} s ({why}); worker log tail:\n{log_tail(log)}",
                    )
                    return
            elif not state["ready"] and (now - launched > self.startup_timeout_s or self.left() <= 0):
                kill()
                self.record(
                    todo[0],
                    "timeout",
                    now - launched,
                    error=f"the worker did not start within {now - launched:.0f} s; log tail:\n{log_tail(log)}",
                )
                return
            elif self.left() <= 0:
                kill()
                return
            time.sleep(self.poll_s)
        if state["current"] is not None:
            code = proc.returncode
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            self.record(
                state["current"],
                "crashed",
                time.monotonic() - state["started"],
                error=f"the worker died during this step ({how}); log tail:\n{log_tail(log)}",
            )
        elif len(self.records) == recorded_before:  # exited without ending anything: never retry forever
            self.record(
                todo[0],
                "crashed",
                time.monotonic() - launched,
                error=f"the worker exited (status {proc.returncode}) before this step; log tail:\n{log_tail(log)}",
            )


# ================================================================================================ the worker
def data_dirs(out_dir: str) -> Dict[str, str]:
    root = os.path.join(out_dir, "data")
    return {
        "root": root,
        "world": os.path.join(root, "world"),
        "bench": os.path.join(root, "bench"),
        "vocab_txt": os.path.join(root, "vocab.txt"),
        "pretrained": os.path.join(root, "pretrained.pt"),
    }


def _wds_samples(path: str):
    """The samples of a webdataset tar in order: lists of (TarInfo, bytes) sharing a key (path up to the first dot
    of the file name, webdataset's rule)."""
    import tarfile

    group, key = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            k = os.path.join(folder, base.split(".", 1)[0])
            if group and k != key:
                yield group
                group = []
            key = k
            group.append((member, tar.extractfile(member).read()))
    if group:
        yield group


def reshard(world_split: str, out_split: str, shards: int) -> int:
    """Cut a split's ``wds/part-*.tar`` and ``grit/part-*.tsv`` into ``shards`` shards each (same samples, same
    order) under ``out_split``; returns the number of samples."""
    import glob
    import io
    import tarfile

    samples = [
        s for path in sorted(glob.glob(os.path.join(world_split, "wds", "part-*.tar"))) for s in _wds_samples(path)
    ]
    rows = [
        line
        for path in sorted(glob.glob(os.path.join(world_split, "grit", "part-*.tsv")))
        for line in open(path, encoding="utf-8")
        if line.strip()
    ]
    if len(samples) < shards or len(rows) < shards:
        raise ValueError(f"{len(samples)} samples / {len(rows)} rows cannot fill {shards} shards")
    for sub in ("wds", "grit"):
        os.makedirs(os.path.join(out_split, sub), exist_ok=True)
    per = math.ceil(len(samples) / shards)
    for k in range(shards):
        with tarfile.open(os.path.join(out_split, "wds", f"part-{k:05d}.tar"), "w") as tar:
            for sample in samples[k * per : (k + 1) * per]:
                for member, data in sample:
                    tar.addfile(member, io.BytesIO(data))
    per = math.ceil(len(rows) / shards)
    for k in range(shards):
        with open(os.path.join(out_split, "grit", f"part-{k:05d}.tsv"), "w", encoding="utf-8") as fh:
            fh.writelines(rows[k * per : (k + 1) * per])
    return len(samples)


def machine_info() -> Dict[str, Any]:
    import torch

    from _timing import machine

    info = machine()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        info["device"] = f"CPU ({info['cpu']}, {info['cores']} cores)"
    return info


def run_setup(p: dict, out_dir: str) -> dict:
    import open_clip
    import torch

    from unilm_vl.data import build_vocab
    from unilm_vl.data.build_vocab import read_captions
    from unilm_vl.data.cosa_vocab import build_wordpiece_vocab, write_vocab
    from unilm_vl.data.synthetic import generate_world

    d = data_dirs(out_dir)
    generate_world(
        d["world"],
        seed=0,
        num_train=p["world_samples"],
        num_val=8,
        num_test=0,
        num_videos=0,
        workers=p["generate_workers"],
    )
    build_vocab.main(
        [
            "--data",
            "train/grit/part-*.tsv",
            "--root",
            d["world"],
            "--out",
            os.path.join(d["world"], "vocab"),
            "--vocab-size",
            "300",
        ]
    )
    write_vocab(build_wordpiece_vocab(read_captions("train/wds/part-*.tar", root=d["world"])), d["vocab_txt"])
    torch.manual_seed(0)
    torch.save(open_clip.create_model("unilm-vl-clip-tiny", pretrained=None).state_dict(), d["pretrained"])
    n = reshard(os.path.join(d["world"], "train"), os.path.join(d["bench"], "train"), p["bench_shards"])
    return {"world_samples": n, "bench_shards": p["bench_shards"], "machine": machine_info()}


def family_argv(family: str, out_dir: str, save_dir: str, batch_size: int, cpu: bool) -> List[str]:
    """``fairseq-train`` arguments of a tiny model of ``family`` on the data of :func:`run_setup` (Adam, no
    shuffling, no validation, no loader workers)."""
    d = data_dirs(out_dir)
    world, vocab = d["world"], os.path.join(d["world"], "vocab")
    wds = [world, "--train-data", "train/wds/part-*.tar", "--valid-data", "val/wds/part-*.tar"]
    specs = {
        "clip": [*wds, "--task", "image_text_contrastive", "--arch", "clip_tiny", "--criterion", "clip"],
        "byolip": [
            *wds,
            "--task",
            "image_text_contrastive",
            "--num-augs",
            "2",
            "--arch",
            "clip_rocket_byolip_tiny",
            "--criterion",
            "byolip",
        ],
        "fsc_clip_lora": [
            *wds,
            "--task",
            "image_text_contrastive",
            "--arch",
            "clip_tiny",
            "--pretrained",
            d["pretrained"],
            "--lora-rank",
            "4",
            "--criterion",
            "fsc_clip",
            "--hard-negatives",
            "fsc-clip",
            "--apply-global-neg-loss",
            "--apply-local-neg-loss",
            "--return-dense-tokens",
        ],
        "cosmos": [
            *wds,
            "--task",
            "image_text_contrastive",
            "--arch",
            "cosmos_tiny",
            "--criterion",
            "cosmos",
            "--use-imagecrop-aug",
            "--local-crops-number",
            "2",
            "--local-crop-size",
            "32",
            "--crop-scale",
            "0.4",
            "--caption-sampling-mode",
            "textcrop",
            "--num-sampled-captions",
            "4",
        ],
        "kosmos2": [
            world,
            "--task",
            "kosmos2",
            "--train-data",
            "train/grit/part-*.tsv",
            "--valid-data",
            "val/grit/part-*.tsv",
            "--spm-model",
            os.path.join(vocab, "sentencepiece.bpe.model"),
            "--dict-path",
            os.path.join(vocab, "dict.txt"),
            "--location-bin-size",
            "16",
            "--image-token-length",
            "16",
            "--arch",
            "kosmos2_tiny",
            "--criterion",
            "kosmos2_lm",
        ],
        "cosa": [
            *wds,
            "--task",
            "cosa_pretrain",
            "--vocab-file",
            d["vocab_txt"],
            "--max-text-tokens",
            "8",
            "--arch",
            "cosa_tiny",
            "--criterion",
            "cosa",
            "--cosa-tasks",
            "ret_cret_ccap_cmlm",
        ],
    }
    common = [
        "--seed",
        "3",
        "--save-dir",
        save_dir,
        "--log-format",
        "none",
        "--no-epoch-checkpoints",
        "--disable-validation",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--clip-norm",
        "1.0",
        "--batch-size",
        str(batch_size),
        "--num-workers",
        "0",
        "--no-shuffle",
    ]
    return [*specs[family], *common, *(["--cpu"] if cpu else [])]


def run_train(p: dict, out_dir: str) -> dict:
    """``p["updates"]`` training steps of fairseq's trainer on one batch, repeated (module docstring)."""
    import copy

    import numpy as np
    import torch
    import torch.distributed as dist
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq.logging import metrics

    from unilm_vl.trainer import UnilmTrainer

    save_dir = os.path.join(out_dir, "runs", p["family"], p["variant"])
    flags = [*family_argv(p["family"], out_dir, save_dir, p["batch_size"], p["cpu"]), *VARIANTS[p["variant"]]]
    argv = ["--user-dir", os.path.join(REPO, "unilm_vl"), *flags]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    metrics.reset()
    cuda = torch.cuda.is_available() and not p["cpu"]
    losses, seconds = [], []
    try:
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        criterion = task.build_criterion(cfg.criterion)
        trainer = UnilmTrainer(cfg, task, model, criterion)
        batch = next(trainer.get_train_iterator(epoch=1).next_epoch_itr(shuffle=False))
        with metrics.aggregate(new_root=True):
            for _ in range(p["updates"]):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = trainer.train_step([copy.deepcopy(batch)])  # a copy: criteria may edit their sample in place
                if cuda:
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
                losses.append(None if out is None else float(out["loss"]))  # None: fp16 overflow, update skipped
        params = sum(t.numel() for t in model.parameters())
    finally:  # FSDP2 made a 1-rank group, and fairseq caches a handle on it: the next run must find neither
        if dist.is_initialized():
            dist.destroy_process_group()
        if hasattr(distributed_utils.get_global_group, "_global_group"):
            del distributed_utils.get_global_group._global_group
    return {
        "losses": losses,
        **loss_flags(losses),
        "update_s_median": statistics.median(seconds),
        "parameters": params,
        "flags": flags,
    }


def run_benchmark(module: str, argv: List[str], out_dir: str) -> dict:
    """``benchmarks/<module>.py``'s ``main(argv)`` in this process; its ``RESULT`` payload."""
    import importlib

    import torch

    import _timing

    if module == "data_pipeline":
        argv = ["--data", data_dirs(out_dir)["bench"], *argv]
    before = len(_timing.RESULTS)
    threads = torch.get_num_threads()
    if module == "data_pipeline":
        torch.set_num_threads(1)  # as its __main__: the decoding happens in the loader workers
    try:
        code = importlib.import_module(module).main(argv)
    finally:
        torch.set_num_threads(threads)
    if code not in (0, None) or len(_timing.RESULTS) == before:
        raise RuntimeError(f"{module}.main({argv}) returned {code} without a RESULT")
    return _timing.RESULTS[-1]


def run_step(s: dict, out_dir: str) -> dict:
    if s["kind"] == "setup":
        return run_setup(s["params"], out_dir)
    if s["kind"] == "train":
        return run_train(s["params"], out_dir)
    if s["kind"] in ("clip_step", "kosmos2_step", "data_pipeline"):
        return run_benchmark(s["kind"], s["params"]["argv"], out_dir)
    raise ValueError(f"unknown step kind {s['kind']!r}")


def _exit_with_parent(parent: int) -> None:
    """A worker whose driver died (killed from outside) must not keep the GPU: exit when re-parented."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def worker_main(args) -> int:
    """Run the steps ``args.steps`` of the plan in order, reporting through ``args.events``; stop after the first
    step that fails (exit status 3) so that the driver continues in a fresh process."""
    import gc
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    with open(args.plan, encoding="utf-8") as fh:
        plan = json.load(fh)
    out_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.plan)))
    events = Events(args.events)
    events.emit(event="ready", pid=os.getpid())
    for index in [int(x) for x in args.steps.split(",")]:
        s = plan[index]
        events.emit(event="start", index=index, name=s["name"])
        print(f"==== step {s['name']}", flush=True)
        start = time.perf_counter()
        try:
            result, status, error = run_step(s, out_dir), "ok", None
        except (Exception, SystemExit) as exc:  # recorded in the report; SystemExit: argparse / error: lines
            traceback.print_exc()
            result, status = {}, "error"
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        events.emit(
            event="end",
            index=index,
            name=s["name"],
            status=status,
            seconds=time.perf_counter() - start,
            result=result,
            error=error,
        )
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        if status != "ok":
            return 3
    return 0


# ================================================================================================ the command line
def write_report(out_dir: str, report: dict) -> None:
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=1, default=str)),
        ("gpu_check.md", markdown(report)),
    ):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def make_report(args, plan: List[dict], steps: List[dict], seconds: float) -> dict:
    steps = json.loads(json.dumps(steps, default=str))
    compare_to_fp32(steps)
    setup = next((s for s in steps if s["kind"] == "setup" and s["status"] == "ok"), None)
    counts = {k: sum(s["status"] == k for s in steps) for k in STATUSES}
    counts["not run yet"] = len(plan) - len(steps)
    return {
        "mode": "smoke" if args.smoke else "gpu",
        "command": sys.argv,
        "seconds": seconds,
        "budget_s": args.budget_s,
        "peak_tflops": NOMINAL_CPU_PEAK_TFLOPS if args.smoke else args.peak_tflops,
        "machine": setup["result"].get("machine") if setup else None,
        "counts": counts,
        "plan": [s["name"] for s in plan],
        "steps": steps,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output directory: gpu_check.json, gpu_check.md, data/, runs/, logs/")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU, each family once and each variant once (the test suite's run)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="total wall-clock seconds; steps left when it is spent are recorded as skipped "
        "(default 450 on GPU, 600 with --smoke)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dense peak TFLOP/s the MFU divides by (989: bf16/fp16 of H100/H200 SXM)",
    )
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES, help="families to train")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="precision / sharding variants of each family",
    )
    parser.add_argument(
        "--train-updates", type=int, default=None, help="updates per family run (default 8 on GPU, 3 with --smoke)"
    )
    parser.add_argument(
        "--data-workers",
        type=int,
        nargs="+",
        default=None,
        help="loader workers of each data-pipeline step (default 8 16 on GPU, 2 with --smoke)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only the steps whose names start with one of these prefixes (setup is kept "
        "when a kept step needs it), e.g. --only kosmos2_xl train/cosa",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--steps", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker and not args.out:
        parser.error("--out is required")
    if args.budget_s is None:
        args.budget_s = 600.0 if args.smoke else 450.0
    if args.data_workers is None:
        args.data_workers = [2] if args.smoke else [8, 16]
    return args


def select(plan: List[dict], prefixes: Optional[Sequence[str]]) -> List[dict]:
    """The steps named by ``prefixes`` (all when None) and the steps they need."""
    if not prefixes:
        return plan
    keep = {s["name"] for s in plan if any(s["name"].startswith(p) for p in prefixes)}
    keep |= {n for s in plan if s["name"] in keep for n in s["needs"]}
    return [s for s in plan if s["name"] in keep]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    plan = select(build_plan(args), args.only)
    if not plan:
        print(f"error: --only {' '.join(args.only)} matches no step", file=sys.stderr)
        return 2
    start = time.monotonic()

    def progress(steps, s):
        write_report(out_dir, make_report(args, plan, steps, time.monotonic() - start))
        print(
            f"[gpu_check {time.monotonic() - start:5.0f} s] {s['name']}: {s['status']}"
            + (f" ({first_line(s['error'] or '', 200)})" if s["status"] != "ok" else ""),
            flush=True,
        )

    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    runner = Runner(
        plan, out_dir, [sys.executable, os.path.abspath(__file__), "--worker"], args.budget_s, env=env, on_step=progress
    )
    print(
        f"[gpu_check] {len(plan)} steps ({'smoke, CPU' if args.smoke else 'GPU'}), budget {args.budget_s:.0f} s, "
        f"output {out_dir}",
        flush=True,
    )

    def stop(signum, frame):  # killed from outside: take the worker down too; the report so far stays on disk
        runner.kill_active()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    steps = runner.run()
    report = make_report(args, plan, steps, time.monotonic() - start)
    write_report(out_dir, report)
    print(markdown(report), flush=True)
    return 0 if all(s["status"] == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
