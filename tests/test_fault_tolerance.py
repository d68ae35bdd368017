"""Fault tolerance through the real fairseq trainer (issue 7, deliverable 4): SIGKILL and restart resumes exactly,
checkpoints are never half-written, a dead or hung rank ends the job within a bounded time, and NaN/Inf losses
are skipped, counted and, when they persist, stop the run."""

import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_train_e2e import model_state, run, train_args

from unilm_vl.fault_tolerance import NonFiniteLossGuard, TooManyNonFiniteLosses, zeroed_logging_output

from conftest import BIN, REPO, write_wds

logger = logging.getLogger(__name__)
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 32 samples in 4 shards, batch 4: 8 updates per epoch
COMMON = ["--optimizer", "adam", "--lr", "1e-3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    write_wds(str(root / "train" / "part"), 32, 8)
    return root


def logged_updates(log):
    """{update: {"loss": str, "gnorm": str, "nan_skipped": str | None}} from ``--log-interval 1`` train_inner lines."""
    out = {}
    for line in log.splitlines():
        if "| train_inner |" not in line:
            continue
        fields = dict(re.findall(r"(\w+)=([^,\s]+)", line))
        out[int(fields["num_updates"])] = {k: fields.get(k) for k in ("loss", "gnorm", "nan_skipped")}
    return out


def popen(cmd):
    """A training job in its own process group (so the test can kill it and its loader workers together)."""
    return subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def read_until(proc, needle, lines):
    """Read the job's output into ``lines`` until a line contains ``needle``; False when the job ended first."""
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return True
    return False


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------ kill / resume
@pytest.mark.slow
def test_sigkill_at_random_update_then_same_command_resumes_exactly(data, tmp_path):
    """Deterministic mode (fixed seed, one loader worker, OMP_NUM_THREADS=1): the restarted run reloads the last
    checkpoint and reproduces the unbroken run's later losses and final weights bit for bit (same ops in the same
    order on the same data, since the iterator replays its position exactly)."""
    kill_at = random.Random(7).randint(3, 8)  # = 5
    cmd = [
        f"{BIN}/fairseq-train",
        *train_args(
            data, tmp_path / "b", *COMMON, "--num-workers", "1", "--save-interval-updates", "2", "--max-update", "10"
        ),
    ]
    unbroken = logged_updates(
        run(
            [
                f"{BIN}/fairseq-train",
                *train_args(
                    data,
                    tmp_path / "a",
                    *COMMON,
                    "--num-workers",
                    "1",
                    "--save-interval-updates",
                    "2",
                    "--max-update",
                    "10",
                ),
            ]
        )
    )
    assert sorted(unbroken) == list(range(1, 11))

    proc, lines = popen(cmd), []
    try:
        assert read_until(proc, f"num_updates={kill_at},", lines), "".join(lines[-30:])
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader worker, mid-run
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    # every checkpoint on disk is complete (a kill during a save leaves at most a *.tmp file)
    for name in os.listdir(tmp_path / "b"):
        if name.endswith(".pt"):
            torch.load(tmp_path / "b" / name, map_location="cpu", weights_only=False)

    resumed_log = run(cmd)
    loaded = re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 1 @ (\d+) updates\)", resumed_log)
    assert loaded, resumed_log[-3000:]
    start = int(loaded.group(1))
    logger.info("killed after update %d; resumed from the checkpoint of update %d", kill_at, start)
    # the save of update kill_at may or may not have finished when the log line of kill_at was read
    assert start in ({kill_at - 2, kill_at} if kill_at % 2 == 0 else {kill_at - 1})
    resumed = logged_updates(resumed_log)
    assert sorted(resumed) == list(range(start + 1, 11))
    for update in resumed:
        assert resumed[update] == unbroken[update], update
    assert_same_weights(
        model_state(tmp_path / "a" / "checkpoint_last.pt"), model_state(tmp_path / "b" / "checkpoint_last.pt")
    )


# ------------------------------------------------------------------------------------------------ atomic save
SAVE_SCRIPT = textwrap.dedent("""
    import io, json, os, shutil, signal, sys
    import torch
    from fairseq import checkpoint_utils
    from fairseq.dataclass.configs import CheckpointConfig
    from unilm_vl.fault_tolerance import install_atomic_checkpoint_copy  # imported once, installed per scenario

    def die_half_way(data, path):  # the process dies with half of the file's bytes on disk
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    class Trainer:  # the attributes fairseq's checkpoint_utils.save_checkpoint uses, saving like fairseq's Trainer
        data_parallel_rank, checkpoint_suffix, task = 0, "", None
        should_save_checkpoint_on_current_rank, always_call_state_dict_during_save_checkpoint = True, False
        def __init__(self, updates): self.updates = updates
        def consolidate_optimizer(self): pass
        def get_num_updates(self): return self.updates
        def save_checkpoint(self, filename, extra_state):
            state = {"model": {"w": torch.full((1 << 19,), float(self.updates))}, "extra_state": extra_state}
            checkpoint_utils.torch_persistent_save(state, filename)
            return filename

    class Itr:
        epoch = 1
        def end_of_epoch(self): return False
        def state_dict(self): return {}

    def scenario(save_dir, fault, shim):
        if shim:
            install_atomic_checkpoint_copy()
        cfg = CheckpointConfig(save_dir=save_dir, save_interval_updates=2, no_epoch_checkpoints=True)
        checkpoint_utils.save_checkpoint(cfg, Trainer(2), Itr(), None)  # completes: checkpoint_1_2.pt + _last.pt
        if fault == "torch_save":
            real_save = torch.save
            def torch_save(obj, f):
                buf = io.BytesIO()
                real_save(obj, buf)
                die_half_way(buf.getvalue(), f.name)
            torch.save = torch_save
        else:  # "copy": fairseq copies checkpoint_1_4.pt onto checkpoint_last.pt
            def copy_dying(src, dst, *args, **kwargs):
                with open(src, "rb") as fh:
                    die_half_way(fh.read(), dst)
            shutil.copyfile = copy_dying
            shutil.copyfileobj = lambda fsrc, fdst, *a, **k: die_half_way(fsrc.read(), fdst.name)
        checkpoint_utils.save_checkpoint(cfg, Trainer(4), Itr(), None)

    status = {}
    for name in sys.argv[2:]:  # one forked process per scenario: fairseq is imported once
        fault, shim = name.split("-")
        pid = os.fork()
        if pid == 0:
            scenario(os.path.join(sys.argv[1], name), fault, shim == "shim")
            os._exit(0)
        status[name] = os.waitpid(pid, 0)[1]
    with open(os.path.join(sys.argv[1], "status.json"), "w") as fh:
        json.dump(status, fh)
""")
SAVE_SCENARIOS = ["torch_save-shim", "copy-shim", "copy-no_shim"]


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    """Directories where a save at update 2 completed and the save at update 4 died half-way through a write."""
    import json

    root = tmp_path_factory.mktemp("saves")
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_SCRIPT, str(root), *SAVE_SCENARIOS],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    status = json.loads((root / "status.json").read_text())
    for name in SAVE_SCENARIOS:  # every scenario died from the injected SIGKILL
        assert os.WIFSIGNALED(status[name]) and os.WTERMSIG(status[name]) == signal.SIGKILL, (name, status)
    return root


def _updates_in(path):
    return int(torch.load(path, map_location="cpu", weights_only=False)["model"]["w"][0])


@pytest.mark.parametrize("fault", ["torch_save", "copy"])
def test_death_during_checkpoint_write_leaves_previous_checkpoint_loadable(killed_saves, fault):
    """fairseq writes the first file of a save to ``.tmp`` and renames it; our shim makes the copies onto
    checkpoint_last.pt atomic too. Killed half-way through either write, checkpoint_last.pt is the previous one."""
    save_dir = killed_saves / f"{fault}-shim"
    assert _updates_in(save_dir / "checkpoint_last.pt") == 2
    assert _updates_in(save_dir / "checkpoint_1_2.pt") == 2
    if fault == "torch_save":  # died writing checkpoint_1_4.pt.tmp: the final name never appeared
        assert not (save_dir / "checkpoint_1_4.pt").exists()
        assert (save_dir / "checkpoint_1_4.pt.tmp").exists()
    else:  # died copying checkpoint_1_4.pt (complete) onto checkpoint_last.pt
        assert _updates_in(save_dir / "checkpoint_1_4.pt") == 4
        assert (save_dir / "checkpoint_last.pt.tmp").exists()


def test_fairseq_copy_without_the_shim_leaves_a_truncated_checkpoint_last(killed_saves):
    """Why the shim exists: fairseq's own copy onto checkpoint_last.pt is not atomic."""
    save_dir = killed_saves / "copy-no_shim"
    assert _updates_in(save_dir / "checkpoint_1_4.pt") == 4
    assert os.path.getsize(save_dir / "checkpoint_last.pt") < os.path.getsize(save_dir / "checkpoint_1_4.pt")
    with pytest.raises(RuntimeError):
        torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------ rank death
def _rank_pid(launcher_pid, rank, timeout=60):
    """PID of the torchrun worker with RANK=rank (read from /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                if ppid != launcher_pid:
                    continue
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if env.get(b"RANK") == str(rank).encode():
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


def _torchrun(data, save_dir, port, *extra):
    return [
        f"{BIN}/torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "unilm_vl.train",
        *train_args(data, save_dir, *COMMON, "--num-workers", "0", "--max-update", "40", *extra),
    ]


def _kill_job(proc, pids):
    """SIGKILL torchrun's process group and its workers (torchrun starts each worker in its own session)."""
    kill_group(proc)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


@pytest.mark.slow
def test_dead_rank_ends_the_job_with_a_clear_error(data, tmp_path):
    """Rank 1 is SIGKILLed after update 2: rank 0 fails at its next collective (gloo: connection reset) and torchrun
    stops the job naming rank 1 and its signal, within seconds instead of hanging."""
    proc, lines, pids = popen(_torchrun(data, tmp_path / "ck", 29571)), [], []
    try:
        assert read_until(proc, "num_updates=2,", lines), "".join(lines[-40:])
        pids = [_rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)]
        os.kill(pids[1], signal.SIGKILL)
        killed = time.time()
        lines.extend(proc.stdout)
        proc.wait(timeout=60)
        elapsed = time.time() - killed
    finally:
        _kill_job(proc, pids)
    out = "".join(lines)
    logger.info("torchrun exited %.1f s after rank 1 was killed", elapsed)
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*-9", out), out[-3000:]
    assert "Signal 9 (SIGKILL) received by PID" in out
    assert "num_updates=40" not in out
    assert not _alive(pids[0])


@pytest.mark.slow
def test_hung_rank_fails_the_others_after_the_collective_timeout(data, tmp_path):
    """Rank 1 is stopped (SIGSTOP: alive, never answering). With ``--collective-timeout 4`` rank 0 fails within
    seconds with gloo's timeout error. Without it, it waits torch's default 30 minutes, and fairseq's
    ``--heartbeat-timeout`` does not help: its SIGINT is not seen while the main thread blocks in gloo."""
    proc, lines, pids = popen(_torchrun(data, tmp_path / "ck", 29573, "--collective-timeout", "4")), [], []
    try:
        assert read_until(proc, "num_updates=2,", lines), "".join(lines[-40:])
        pids = [_rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)]
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.time()
        assert read_until(proc, "Timed out waiting 4000ms", lines), "".join(lines[-40:])
        elapsed = time.time() - stopped
        deadline = time.time() + 30
        while time.time() < deadline and _alive(pids[0]):
            time.sleep(0.2)
        rank0_exit = time.time() - stopped
    finally:
        _kill_job(proc, pids)  # SIGKILL also ends the stopped rank
    logger.info("rank 0 raised the timeout %.1f s and exited %.1f s after rank 1 stopped", elapsed, rank0_exit)
    assert "collective timeout: 4 s" in "".join(lines)
    assert 4 <= elapsed < 25, elapsed
    assert rank0_exit < 30, rank0_exit


def _alive(pid):
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------ NaN / Inf losses
NAN_PLUGIN = textwrap.dedent('''
    """Test-only: the ``clip`` criterion with NaN losses injected at chosen training forwards of one rank."""
    from dataclasses import dataclass, field

    from fairseq.criterions import register_criterion

    import unilm_vl  # noqa: F401  (registers the tasks, models and criteria)
    from unilm_vl.criterions.clip import ClipCriterion, ClipCriterionConfig
    from unilm_vl.losses.distributed import data_parallel_rank_world


    @dataclass
    class NanInjectedClipConfig(ClipCriterionConfig):
        nan_updates: str = field(default="", metadata={"help": "comma-separated 1-based training forwards made NaN"})
        nan_rank: int = field(default=-1, metadata={"help": "only this rank's loss is made NaN (-1: every rank)"})


    @register_criterion("nan_injected_clip", dataclass=NanInjectedClipConfig)
    class NanInjectedClipCriterion(ClipCriterion):
        def __init__(self, cfg, task):
            super().__init__(cfg, task)
            self.forwards = 0
            self.nan_at = {int(u) for u in cfg.nan_updates.split(",") if u}

        def forward(self, model, sample, reduce=True):
            loss, sample_size, logging_output = super().forward(model, sample, reduce)
            if model.training:
                self.forwards += 1
                if self.forwards in self.nan_at and self.cfg.nan_rank in (-1, data_parallel_rank_world()[0]):
                    loss = loss * float("nan")
                    logging_output = {**logging_output, "loss": float("nan"), "clip_loss": float("nan")}
            return loss, sample_size, logging_output
''')


@pytest.fixture
def nan_plugin(tmp_path):
    plugin = tmp_path / "unilm_vl_nan_injection"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(NAN_PLUGIN)
    return str(plugin)


def _nan_args(data, save_dir, plugin, *extra):
    args = train_args(data, save_dir, *COMMON, "--num-workers", "0", "--criterion", "nan_injected_clip", *extra)
    args[args.index("--user-dir") + 1] = plugin
    return args


def _optimizer_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["last_optimizer_state"]["state"]


@pytest.mark.slow
def test_nan_loss_on_one_rank_skips_the_update_on_every_rank(data, tmp_path, nan_plugin):
    """Rank 1's loss is NaN at updates 3 and 5 of 6 (2 ranks x batch 2, all in epoch 1): both ranks skip those
    optimizer steps (weights and Adam state stay those of the previous update), log nan_skipped=1 there (2 for the
    epoch), and the run finishes."""
    save = tmp_path / "ck"
    out = run(
        [
            f"{BIN}/torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29575",
            "-m",
            "unilm_vl.train",
            *_nan_args(
                data,
                save,
                nan_plugin,
                "--nan-updates",
                "3,5",
                "--nan-rank",
                "1",
                "--save-interval-updates",
                "1",
                "--max-update",
                "6",
                "--batch-size",
                "2",
            ),
        ]
    )
    logged = logged_updates(out)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    # the counter appears with the first skip, then counts skips per log interval
    assert {u: logged[u]["nan_skipped"] for u in logged} == {1: None, 2: None, 3: "1", 4: "0", 5: "1", 6: "0"}
    assert re.search(r"\| train \| epoch 001 .*\| nan_skipped 2 \|", out)
    assert "update 3: another rank's loss is NaN/Inf; skipping the update" in out  # rank 0's view (it logs)
    states = {u: model_state(save / f"checkpoint_1_{u}.pt") for u in range(2, 7)}
    for skipped in (3, 5):
        assert_same_weights(states[skipped - 1], states[skipped])
        before, after = (
            _optimizer_state(save / f"checkpoint_1_{skipped - 1}.pt"),
            _optimizer_state(save / f"checkpoint_1_{skipped}.pt"),
        )
        for key in before:
            for name in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(
                    torch.as_tensor(after[key][name]), torch.as_tensor(before[key][name]), atol=0, rtol=0
                )
    for stepped in (4, 6):  # finite updates do move the weights
        a, b = states[stepped - 1], states[stepped]
        assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    for u in (1, 2, 4, 6):
        assert logged[u]["loss"] != "nan" and logged[u]["gnorm"] != "nan"


@pytest.mark.slow
def test_repeated_nan_losses_stop_the_run_with_a_clear_message(data, tmp_path, nan_plugin):
    proc = subprocess.run(
        [
            f"{BIN}/fairseq-train",
            *_nan_args(
                data,
                tmp_path / "ck",
                nan_plugin,
                "--nan-updates",
                "2,3,4,5",
                "--max-consecutive-nan-steps",
                "2",
                "--max-update",
                "8",
            ),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        "TooManyNonFiniteLosses: 3 consecutive updates (the last is update 4) had a NaN/Inf loss, more than "
        "--max-consecutive-nan-steps 2; stopping"
    ) in out
    logged = logged_updates(out)
    assert {u: logged[u]["nan_skipped"] for u in logged} == {1: None, 2: "1", 3: "1"}


# ------------------------------------------------------------------------------------------------ guard unit tests
class _FakeOptimizer:
    def __init__(self):
        self.zeroed = 0

    def zero_grad(self):
        self.zeroed += 1


def test_guard_skips_only_updates_with_a_non_finite_loss_and_counts_consecutive_ones():
    guard, opt = NonFiniteLossGuard(max_consecutive=1), _FakeOptimizer()
    log = {"loss": 2.5, "nsentences": 4, "sample_size": 1, "name": "x"}
    assert guard.after_backward(torch.tensor(2.5), 1, log, opt, 0, False) == (1, log)
    assert guard.should_step(opt, 0) and opt.zeroed == 0
    # update 1: NaN loss; the dummy-batch flag (ignore_grad) would exempt it
    assert guard.after_backward(torch.tensor(float("inf")), 1, log, opt, 1, True) == (1, log)
    size, out = guard.after_backward(torch.tensor(float("nan")), 1, log, opt, 1, False)
    assert (size, out) == (0, {"loss": 0.0, "nsentences": 0, "sample_size": 0, "name": "x"})
    # a later finite micro-batch of the same update is skipped too
    assert guard.after_backward(torch.tensor(1.0), 1, log, opt, 1, False)[0] == 0 and opt.zeroed == 2
    assert not guard.should_step(opt, 1) and guard.consecutive == 1 and guard.skipped_total == 1
    assert guard.should_step(opt, 2) and guard.consecutive == 0  # a finite update resets the run of skips
    guard.after_backward(torch.tensor(float("nan")), 1, log, opt, 3, False)
    assert not guard.should_step(opt, 3)
    guard.after_backward(torch.tensor(float("-inf")), 1, log, opt, 4, False)
    with pytest.raises(TooManyNonFiniteLosses, match=r"2 consecutive updates \(the last is update 5\)"):
        guard.should_step(opt, 4)


def test_zeroed_logging_output_keeps_keys_and_types():
    out = zeroed_logging_output({"loss": float("nan"), "n": 3, "t": torch.tensor([1.0, float("inf")]), "f": True})
    assert out["loss"] == 0.0 and isinstance(out["loss"], float) and out["n"] == 0 and isinstance(out["n"], int)
    assert torch.equal(out["t"], torch.zeros(2)) and out["f"] is True


def test_skipped_update_under_amp_closes_the_grad_scaler_iteration():
    """fairseq's AMP clip_grad_norm calls the scaler's unscale_; a skipped step must still call its update(), or
    the next update's unscale_ raises."""
    from fairseq.optim.amp_optimizer import AMPOptimizer

    class Scaler:
        updates = 0

        def update(self):
            Scaler.updates += 1

    optimizer = object.__new__(AMPOptimizer)
    optimizer._grad_scaler = Scaler()
    optimizer.zero_grad = lambda: None
    guard = NonFiniteLossGuard(max_consecutive=3)
    guard.after_backward(torch.tensor(float("nan")), 1, {"loss": 1.0}, optimizer, 7, False)
    assert not guard.should_step(optimizer, 7) and Scaler.updates == 1
    assert guard.should_step(optimizer, 8) and Scaler.updates == 1  # a stepped update leaves it to optimizer.step
