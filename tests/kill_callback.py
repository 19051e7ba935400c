"""A Trainer callback for the crash tests: ``--trainer_callback kill_callback:KillAfterSave`` (tests/ on PYTHONPATH).

It SIGKILLs every rank once the checkpoint of step ``UNIATTN_KILL_STEP`` of the stage folder named
``UNIATTN_KILL_STAGE`` has been saved, as a crash mid-run would.
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
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # rank 0 has finished writing the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
