"""Checkpoints and run directories: one module saves and loads a run's state, for one process or
many, and decides — before any model is built — whether a run may start, resume, or must stop.

A checkpoint ``RUN/checkpoints/epoch-XXXXXX/`` holds::

    pytorch_lora_weights.safetensors  the LoRA (diffusers format, loads with load_lora_weights)
    flow_model/                       the flow model (diffusers format, safetensors)
    training_state.pt                 TrainingState: optimiser, counters, sample buffer, RNG, config
    shards/rank-XXXXX.pt              several processes: each rank's sample buffer and RNG state
    shards/deepspeed/<group>/         DeepSpeed ZeRO: each rank's optimiser partitions
    manifest.json                     epoch, world size, resolved config, size + sha256 of each file

It is written into a temporary directory beside its final place, the manifest last, and renamed
when complete; ``latest`` (one line) is replaced atomically.  A checkpoint is *intact* when every
file of its manifest is there with its size and checksum; ``--resume`` uses the newest intact one
and says which damaged ones it skipped.  Nothing is unpickled: tensors are safetensors files or
``torch.load(weights_only=True)`` (the training state and the per-rank shards), the rest JSON.
DeepSpeed's partitions are read by DeepSpeed's own loader after their checksums matched.

:func:`decide_start` checks a start or resume without touching anything (world size, the checkpoint's
config against this one, damaged checkpoints); :func:`start_run` then tidies the run directory
(stale temporary files, damaged checkpoints set aside, ``metrics.jsonl`` cut back to the resumed
epoch) and writes ``config.json``.

Modules: :mod:`.state` (TrainingState, file names, errors), :mod:`.files` (atomic writes, manifest,
verification, a run's checkpoints), :mod:`.saving` (save / load), :mod:`.resume` (decide_start,
start_run, compare_configs).
"""
from .files import (atomic_write_text, checkpoints, epoch_of, fsync_dir, fsync_tree, latest_checkpoint, make_temp_dir,
                    newest_first, read_manifest, remove_stale_temporaries, set_aside, sha256, usual_modes, verify,
                    write_manifest)
from .resume import (HARMLESS, NOT_HARMLESS, RUN_OUTPUTS, RunStart, compare_configs, env_world_size, decide_start,
                     start_run, truncate_metrics)
from .saving import load, load_lora_into, lora_state_dict, save, save_lora
from .state import (ABANDONED_DIR, DAMAGED_DIR, FLOW_DIR, FLOW_FILE, FORMAT, LIKELY_CAUSES, LORA_FILE, MANIFEST,
                    RANK_FILE, STATE_FILE, NonFiniteError, RunError, TrainingState, buffer_from_state, buffer_state,
                    check_finite, rng_state, set_rng_state)

__all__ = ["ABANDONED_DIR", "DAMAGED_DIR", "FLOW_DIR", "FLOW_FILE", "FORMAT", "HARMLESS", "LIKELY_CAUSES", "LORA_FILE",
           "MANIFEST", "NOT_HARMLESS", "NonFiniteError", "RANK_FILE", "RUN_OUTPUTS", "RunError", "RunStart",
           "STATE_FILE", "TrainingState", "atomic_write_text", "buffer_from_state", "buffer_state",
           "check_finite", "checkpoints", "compare_configs", "env_world_size", "epoch_of", "fsync_dir", "fsync_tree",
           "latest_checkpoint", "load",
           "load_lora_into", "lora_state_dict", "make_temp_dir", "newest_first", "decide_start", "read_manifest",
           "remove_stale_temporaries", "rng_state", "save", "save_lora", "set_aside", "set_rng_state", "sha256",
           "start_run", "truncate_metrics", "usual_modes", "verify", "write_manifest"]
