"""A Trainer callback for the crash tests: ``--trainer_callback kill_callback:KillAfterSave`` (tests/ on PYTHONPATH).

It SIGKILLs every rank once the checkpoint of step ``UNIATTN_KILL_STEP`` of the stage folder named
``UNIATTN_KILL_STAGE`` has been saved, as a crash mid-run would; with ``UNIATTN_KILL_RANK`` set, only that
rank dies, and without waiting for the others (one dead process in a running job).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == os.environ["UNIATTN_KILL_STAGE"] and state.global_step == int(
                os.environ["UNIATTN_KILL_STEP"]):
            only = os.environ.get("UNIATTN_KILL_RANK")
            if only is not None:
                if int(os.environ.get("RANK", 0)) == int(only):
                    os.kill(os.getpid(), signal.SIGKILL)
                return
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # rank 0 has finished writing the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
