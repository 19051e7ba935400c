"""The entry point: parse, check, train, with exit codes and the launcher's environment."""


from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings
from pathlib import Path


from ..net import free_port
from .resume import CheckpointError

from .arguments import parse_args
from .checks import check_everything
from .stages import train

logger = logging.getLogger(__name__)


def _launcher_env() -> None:
    # DeepSpeed without a launcher looks for MPI; one process needs only these.
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def shm_buffer() -> Path:
    """This rank's DeepSpeed CPU all-reduce buffer (``deepspeed/ops/csrc/cpu/comm/shm.cpp`` names it so)."""
    env = os.environ
    return Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_"
                            f"{env.get('MASTER_PORT')}_{env.get('RANK', '0')}")


def _remove_shm_buffer_at_exit() -> None:
    # DeepSpeed's CPU all-reduce maps a 66 MB file in /dev/shm per rank and never unlinks it: on a CPU machine every
    # run leaked one, until tmpfs ate the memory (it did: CI was OOM-killed after a day of runs). The peers opened
    # it when the group formed, so unlinking at exit cannot pull it from under them.
    atexit.register(lambda: shm_buffer().unlink(missing_ok=True))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 deprecates, once per bucket per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        script, targs, config = parse_args(argv)
        checked = check_everything(script, targs, config)
    except (ValueError, FileNotFoundError, CheckpointError) as err:  # DataError, UsageError, layout errors
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if script.check_only:
        print("ok: arguments, data, init file and OUTPUT_DIR are usable")
        return 0
    if checked.finished:
        if rank == 0:
            print(f"{targs['output_dir']}/final exists: this run already finished; pass a new OUTPUT_DIR to train again")
        return 0
    _launcher_env()
    _remove_shm_buffer_at_exit()
    final = train(script, targs, checked)
    if rank == 0:
        print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

