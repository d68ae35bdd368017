"""``benchmarks/gpu_check.sh``: the prepared GPU check. Its ``--smoke`` run (the same steps at tiny shapes on CPU)
must record every planned step as succeeded with finite losses, and write a markdown row per step; the driver's time
boxes, crash handling, budget and skip rules are tested with a stand-in worker; the verdicts and the re-sharding
with known inputs."""

import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from conftest import REPO, write_tsv, write_wds

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/ is not a package)

from _timing import mfu, peak_tflops  # noqa: E402


# ---------------------------------------------------------------------------------------------- the smoke run
@pytest.mark.slow
def test_smoke_run_records_every_step_succeeded(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = [s["name"] for s in report["steps"]]
    assert names == report["plan"]
    failed = {s["name"]: s["error"] for s in report["steps"] if s["status"] != "ok" or s["error"]}
    assert not failed, failed
    # every kind of step the GPU run has, every family and every precision / sharding variant
    trains = [s for s in report["steps"] if s["kind"] == "train"]
    assert {s["params"]["family"] for s in trains} == set(gpu_check.FAMILIES)
    assert {s["params"]["variant"] for s in trains} == set(gpu_check.VARIANTS)
    assert {"setup", "clip_vit_b16", "kosmos2_base", "kosmos2_xl", "data_workers2"} <= set(names)
    for s in trains:
        losses = s["result"]["losses"]
        assert len(losses) == s["params"]["updates"] and all(x is not None and math.isfinite(x) for x in losses)
        assert s["result"]["finite"] is True
    results = {s["name"]: s["result"] for s in report["steps"]}
    for name in ("clip_vit_b16", "kosmos2_base", "kosmos2_xl"):
        r = results[name]
        assert r["train_step"]["ratio"] > 0 and r["peak_tflops"] == gpu_check.NOMINAL_CPU_PEAK_TFLOPS
        assert r["mfu_ours"] == pytest.approx(r["step_tflops"] / r["train_step"]["ours_s"] / r["peak_tflops"])
    for name in ("kosmos2_base", "kosmos2_xl"):  # same weights on both sides: same first loss and greedy tokens
        r = results[name]
        assert r["first_loss"]["ours"] == pytest.approx(r["first_loss"]["hf"], rel=2e-2)
        assert r["tokens_per_s"]["ours"] > 0 and r["greedy_rows_identical"] == 1.0
        flops = r["flops"]
        assert flops["step_flops"] == 3 * flops["forward_flops"] - 2 * flops["tower_forward_flops"]
    r = results["data_workers2"]
    assert r["wds_vs_open_clip"]["samples_per_pass"] == {"ours": 64, "peer": 64}
    assert r["tsv_vs_open_clip"]["samples_per_pass"] == {"ours": 64, "peer": 64}
    table = (out / "gpu_check.md").read_text().splitlines()
    for name in names:
        rows = [line for line in table if line.startswith(f"| {name} | ok |")]
        assert len(rows) == 1, name


def test_script_stops_with_one_error_line_without_packages_or_gpu(tmp_path):
    script = os.path.join(REPO, "benchmarks", "gpu_check.sh")
    bare = tmp_path / "python"  # the same interpreter without site-packages: torch & co. are missing
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    proc = subprocess.run(
        ["bash", script, "--smoke", "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(bare)},
        timeout=60,
    )
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu_check: ") and "torch" in lines[0]
    assert "bash scripts/install.sh" in lines[0]
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run(
        ["bash", script, "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: gpu_check: torch sees no CUDA GPU (use --smoke for the CPU run of the same steps)"
    ]


# ---------------------------------------------------------------------------------------------- the driver
FAKE_WORKER = textwrap.dedent("""
    import argparse, json, os, sys, time
    sys.path.insert(0, {benchmarks!r})
    from gpu_check import Events
    p = argparse.ArgumentParser()
    for flag in ("--plan", "--steps", "--events"):
        p.add_argument(flag)
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    plan = json.load(open(args.plan))
    events = Events(args.events)
    events.emit(event="ready", pid=os.getpid())
    for i in map(int, args.steps.split(",")):
        kind = plan[i]["kind"]
        events.emit(event="start", index=i)
        if kind == "sleep":
            time.sleep(60)
        if kind == "crash":
            os._exit(7)
        if kind == "fail":
            events.emit(event="end", index=i, status="error", seconds=0.0, result={{}}, error="ValueError: bad")
            sys.exit(3)
        events.emit(event="end", index=i, status="ok", seconds=0.0, result={{"pid": os.getpid()}}, error=None)
""")


def run_fake(tmp_path, plan, budget_s=60.0):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER.format(benchmarks=os.path.join(REPO, "benchmarks")))
    runner = gpu_check.Runner(
        plan, str(tmp_path / "out"), [sys.executable, str(worker), "--worker"], budget_s, poll_s=0.05
    )
    return {s["name"]: s for s in runner.run()}, runner


def test_runner_time_box_crash_error_and_needs(tmp_path):
    step = gpu_check.step
    plan = [
        step("setup", "ok", "a", 20),
        step("hang", "sleep", "a", 1.0, ["setup"]),
        step("b", "ok", "a", 20),
        step("dies", "crash", "a", 20),
        step("c", "ok", "a", 20),
        step("raises", "fail", "z", 20),
        step("after_raises", "ok", "z", 20, ["raises"]),
        step("d", "ok", "z", 20),
    ]
    steps, runner = run_fake(tmp_path, plan)
    assert [steps[s["name"]]["status"] for s in plan] == [
        "ok",
        "timeout",
        "ok",
        "crashed",
        "ok",
        "error",
        "skipped",
        "ok",
    ]
    assert "time box of 1 s" in steps["hang"]["error"] and 1.0 <= steps["hang"]["seconds"] < 10
    assert "exit status 7" in steps["dies"]["error"]
    assert steps["raises"]["error"].startswith("ValueError: bad") and "worker log" in steps["raises"]["error"]
    assert "needs step 'raises'" in steps["after_raises"]["error"]
    # a step after a timeout / crash / error runs in a fresh worker; successes share one
    pids = {name: steps[name]["result"]["pid"] for name in ("setup", "b", "c", "d")}
    assert len(set(pids.values())) == 4 and runner.launches == 5


def test_runner_budget_cuts_the_running_step_and_skips_the_rest(tmp_path):
    step = gpu_check.step
    plan = [step("first", "ok", "a", 20), step("hang", "sleep", "a", 30), step("later", "ok", "b", 20)]
    steps, _ = run_fake(tmp_path, plan, budget_s=3.0)
    assert steps["first"]["status"] == "ok"
    assert steps["hang"]["status"] == "timeout" and "total budget" in steps["hang"]["error"]
    assert steps["later"]["status"] == "skipped" and "budget" in steps["later"]["error"]


# ---------------------------------------------------------------------------------------------- verdicts and tables
def test_loss_flags():
    assert gpu_check.loss_flags([2.0, 1.5, 1.2]) == {
        "finite": True,
        "falling": True,
        "skipped_updates": 0,
        "first_loss": 2.0,
        "last_loss": 1.2,
    }
    # last third of 6 losses: mean(1.9, 2.3) = 2.1 >= 2.0: not falling although the last loss is lower
    assert gpu_check.loss_flags([2.0, 1.0, 1.0, 1.0, 2.3, 1.9])["falling"] is False
    flags = gpu_check.loss_flags([None, 3.0, 2.0])  # an fp16-overflow update is counted, not judged
    assert flags["skipped_updates"] == 1 and flags["first_loss"] == 3.0 and flags["falling"] is True
    assert gpu_check.loss_flags([2.0, float("nan")])["finite"] is False
    assert gpu_check.loss_flags([None, None]) == {
        "finite": False,
        "falling": False,
        "skipped_updates": 2,
        "first_loss": None,
        "last_loss": None,
    }


def test_compare_to_fp32_and_markdown_rows():
    def train(family, variant, first, status="ok"):
        return {
            "name": f"train/{family}/{variant}",
            "kind": "train",
            "status": status,
            "seconds": 1.0,
            "params": {"family": family, "variant": variant},
            "result": {
                "losses": [first, first / 2],
                **gpu_check.loss_flags([first, first / 2]),
                "update_s_median": 0.01,
            }
            if status == "ok"
            else {},
            "error": None if status == "ok" else "RuntimeError: expected scalar type BFloat16\ntraceback",
        }

    steps = [
        train("clip", "fp32", 2.0),
        train("clip", "fp16", 2.01),
        train("cosa", "fp16", 5.0),
        train("cosa", "fsdp2_bf16", 0, status="error"),
    ]
    gpu_check.compare_to_fp32(steps)
    assert steps[1]["result"]["first_loss_rel_diff_vs_fp32"] == pytest.approx(0.005)
    assert "first_loss_rel_diff_vs_fp32" not in steps[0]["result"]  # the reference itself
    assert "first_loss_rel_diff_vs_fp32" not in steps[2]["result"]  # no fp32 run of cosa
    report = {
        "mode": "gpu",
        "machine": {"device": "test"},
        "seconds": 4.0,
        "budget_s": 450.0,
        "peak_tflops": 989.0,
        "counts": {"ok": 3, "error": 1},
        "steps": steps,
    }
    table = gpu_check.markdown(report)
    assert (
        "| train/clip/fp16 | ok | 1.0 | loss 2.010 1.005; finite yes, falling yes; 10 ms/update; first loss vs "
        "fp32 5.0e-03 |" in table
    )
    assert "| train/cosa/fsdp2_bf16 | error | 1.0 | RuntimeError: expected scalar type BFloat16 |" in table
    assert "### train/cosa/fsdp2_bf16 (error)" in table and "traceback" in table


def test_mfu_and_peak():
    assert mfu(2e12, 0.5, 989.0) == pytest.approx(4e12 / 989e12)
    assert peak_tflops("cpu", None) is None and peak_tflops("cpu", 3.5) == 3.5


def test_plans_cover_every_family_and_variant():
    gpu = gpu_check.build_plan(gpu_check.parse_args(["--out", "x"]))
    smoke = gpu_check.build_plan(gpu_check.parse_args(["--out", "x", "--smoke"]))
    for plan, runs in ((gpu, len(gpu_check.FAMILIES) * len(gpu_check.VARIANTS)), (smoke, len(gpu_check.FAMILIES))):
        trains = [s for s in plan if s["kind"] == "train"]
        assert len(trains) == runs
        assert {s["params"]["family"] for s in trains} == set(gpu_check.FAMILIES)
        assert {s["params"]["variant"] for s in trains} == set(gpu_check.VARIANTS)
    assert [s["name"] for s in gpu if s["kind"] != "train"] == [
        "setup",
        "clip_vit_b16",
        "kosmos2_base",
        "kosmos2_xl",
        "data_workers8",
        "data_workers16",
    ]
    assert [s["name"] for s in smoke if s["kind"] != "train"] == [
        "setup",
        "clip_vit_b16",
        "kosmos2_base",
        "kosmos2_xl",
        "data_workers2",
    ]
    xl = next(s for s in gpu if s["name"] == "kosmos2_xl")["params"]["argv"]
    assert xl[xl.index("--arch") + 1] == "xl" and xl[xl.index("--peak-tflops") + 1] == "989.0"
    assert sum(s["timeout_s"] for s in gpu) > 450  # the total budget, not the sum of the boxes, bounds the run
    only = gpu_check.select(gpu, ["kosmos2_xl", "data_workers8"])
    assert [s["name"] for s in only] == ["setup", "kosmos2_xl", "data_workers8"]


def test_reshard_keeps_every_sample_in_order(tmp_path):
    world = tmp_path / "world" / "train"
    write_wds(str(world / "wds" / "part"), 10, 10)
    keys = write_tsv(str(world / "grit" / "part"), 10, 10)
    assert gpu_check.reshard(str(world), str(tmp_path / "bench" / "train"), 4) == 10
    tars = sorted((tmp_path / "bench" / "train" / "wds").glob("part-*.tar"))
    assert [t.name for t in tars] == [f"part-{k:05d}.tar" for k in range(4)]
    names = [[m.name for m in tarfile.open(t)] for t in tars]
    assert [len(n) for n in names] == [9, 9, 9, 3]  # ceil(10 / 4) = 3 samples of 3 members per shard
    assert [n.split(".")[0] for shard in names for n in shard[::3]] == [f"{i:06d}" for i in range(10)]
    rows = [
        line.split("\t")[0]
        for t in sorted((tmp_path / "bench" / "train" / "grit").glob("part-*.tsv"))
        for line in open(t)
    ]
    assert rows == keys
    with pytest.raises(ValueError, match="cannot fill 11 shards"):
        gpu_check.reshard(str(world), str(tmp_path / "other"), 11)
