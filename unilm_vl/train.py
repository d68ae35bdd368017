"""``python -m unilm_vl.train ARGS``: ``fairseq-train`` with ``--user-dir`` pointing at this package, so it works
from any directory once unilm_vl is installed. Under ``torchrun ... -m unilm_vl.train ... --cpu`` it also adds the
flags CPU multi-process training needs (see :func:`with_torchrun_cpu`)."""

import os
import sys


def with_user_dir(argv):
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        return list(argv)
    return [argv[0], "--user-dir", os.path.dirname(os.path.abspath(__file__))] + list(argv[1:])


def with_torchrun_cpu(argv, env=os.environ):
    """Under ``torchrun`` with ``--cpu``, add the distributed flags fairseq cannot infer on CPU (its inference
    divides by the CUDA device count): gloo, env:// init, no spawn, legacy DDP, and this process's rank."""
    if "--cpu" not in argv or "RANK" not in env or "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) < 2:
        return list(argv)
    wanted = {
        "--distributed-backend": "gloo",
        "--distributed-init-method": "env://",
        "--ddp-backend": "legacy_ddp",
        "--distributed-rank": env["RANK"],
        "--distributed-world-size": env["WORLD_SIZE"],
    }
    out = list(argv)
    for flag, value in wanted.items():
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            out += [flag, value]
    if "--distributed-no-spawn" not in out:
        out.append("--distributed-no-spawn")
    return out


def check_cpu_backend(argv):
    """``--ddp-backend fully_sharded`` (fairscale FSDP) computes on CUDA only: with ``--cpu`` it would fail inside
    fairscale with "Found no NVIDIA driver"; stop first with what to use instead."""
    backend = None
    for i, arg in enumerate(argv):  # the last occurrence wins, as in argparse
        if arg == "--ddp-backend" and i + 1 < len(argv):
            backend = argv[i + 1]
        elif arg.startswith("--ddp-backend="):
            backend = arg.split("=", 1)[1]
    if "--cpu" in argv and backend == "fully_sharded":
        raise ValueError(
            "--ddp-backend fully_sharded (fairscale FSDP) needs CUDA GPUs; on CPU use legacy_ddp (the "
            "default under torchrun --cpu) or pytorch_ddp"
        )


def _flag_values(argv, flag):
    """Every value given to ``flag`` in ``argv`` (``--flag V`` and ``--flag=V``)."""
    values = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def check_checkpoint_paths(argv):
    """A ``--restore-file`` other than fairseq's default ``checkpoint_last.pt`` that does not exist would start the
    training from scratch with only an INFO line ("No existing checkpoint found"); a missing
    ``--finetune-from-model`` dies in fairseq with a traceback. Stop first, naming the flag."""
    for flag in ("--restore-file", "--finetune-from-model"):
        for value in _flag_values(argv, flag):
            if flag == "--restore-file" and value == "checkpoint_last.pt":
                continue
            if not os.path.isfile(value):
                raise FileNotFoundError(f"{flag} {value}: no such checkpoint file")


def cli_main():
    from fairseq_cli.train import cli_main as fairseq_train

    from .logging_utils import setup_cli_logging

    setup_cli_logging()
    check_cpu_backend(sys.argv)
    check_checkpoint_paths(sys.argv)
    sys.argv = with_torchrun_cpu(with_user_dir(sys.argv))
    fairseq_train()


def console_main():
    """``python -m unilm_vl.train`` and the ``unilm-vl-train`` script: :func:`cli_main` with a user mistake (a missing
    data file, an unreadable checkpoint, a vocabulary that does not fit) ending in one ``error:`` line and exit
    status 2 (:func:`unilm_vl.cli.run_cli`)."""
    from .cli import run_cli

    sys.exit(run_cli(cli_main))


if __name__ == "__main__":
    console_main()
