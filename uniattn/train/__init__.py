"""Post-training on the Hugging Face Trainer with DeepSpeed: plain, softmax, UniAttn and CLA fine-tuning.

    deepspeed --num_gpus N --module uniattn.train --mode uniattn --model_dir BASE \\
        --data dataset/pmc_llama_instructions_1000.json --superblock 4 14 30 \\
        --init_path INIT.safetensors --output_dir outputs/uniattn [--max_steps 5 ...]

Modes (UNIATTN.md section 5):

* ``plain``: ordinary full fine-tuning of the checkpoint.
* ``softmax``: convert to SuperBlocks ``G B E`` with followers that have no
  compensation ``W_c`` at all (``superblock_compensation=False``: ``o_proj(P V)``,
  no ``W_c`` matmul or parameters) and fine-tune everything: the seed's
  "Softmax unification only" baseline. (Runs begun before this kept a frozen,
  all-zero ``W_c``, which computes the same; such a run resumes with it.)
* ``uniattn``: convert, load ``W_c`` from the init-calc file, then two stages in
  one command with the same data and schedule: stage 1 trains only the ``W_c``
  tensors (everything else ``requires_grad=False``), stage 2 trains everything,
  starting from stage 1's result. ``--zero_init`` starts ``W_c`` at zero instead
  of the init-calc values (the ablation "UniAttn without init").
  Stage-1 ablations (defaults = the seed's recipe): ``--stage1_objective kl``
  distils the base model's next-token distribution instead of the SFT loss
  (optionally on unlabelled ``--stage1_data``), ``--stage1_trainable
  compensation_vo`` also trains the followers' V/O projections,
  ``--stage1_share F`` splits the records and ``--max_steps`` between the
  stages (equal total steps, no record seen by both), ``--init_scale S``
  multiplies the init-calc ``W_c`` by ``S``.
* ``cla``: the cross-layer KV sharing baseline on the same layout: followers keep
  their Q and attend over the leader's K and V (their own K/V projections are
  dropped, no compensation); everything trains, one stage.
* ``drop``: the layer-dropping (LLMDrop) baseline on the same layout: followers
  lose their attention sub-layer (``h = x`` + MLP part; no Q/K/V/O projections,
  no cache, no compensation); everything trains, one stage.

Hyper-parameters come from the preset in ``configs/`` that matches the model
(see ``uniattn.train.presets``); any ``TrainingArguments`` flag overrides it. The
loss covers response tokens only; batches are padded to their longest example.
bf16 on GPU, float32 on a CPU-only machine.

Restarting the same command resumes: finished stages (a ``final`` folder) are
skipped, an unfinished one resumes from its newest checkpoint, which is checked
first (see ``uniattn.train.resume``). Every checkpoint is a loadable model with its
tokenizer (UniAttn ones carry ``auto_map`` and their code). Arguments, data,
init file and checkpoints are all checked before anything is written.

Modules: ``arguments`` (parser, presets merged), ``checks`` (everything checked before anything is
written, the stage plan), ``stages`` (data, model, the Trainer loop, publishing), ``launch`` (``main``),
``presets``, ``resume``, ``distill`` (stage 1 as KL distillation).
"""

from .arguments import MODES, STAGE1_DEFAULTS, UsageError, build_parser, parse_args
from .checks import (Checked, Stage, _check_lengths, callback_classes, check_everything, plan_stages, sharing_of,
                     split_records)
from .launch import main
from .stages import build_model, train

__all__ = ["MODES", "STAGE1_DEFAULTS", "Checked", "Stage", "UsageError", "build_model", "build_parser",
           "callback_classes", "check_everything", "main", "parse_args", "plan_stages", "sharing_of", "split_records",
           "train", "_check_lengths"]
