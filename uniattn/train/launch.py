"""The entry point: parse, check, train, with exit codes and the launcher's environment."""


from __future__ import annotations

import logging
import os
import sys
import warnings


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
    final = train(script, targs, checked)
    if rank == 0:
        print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

