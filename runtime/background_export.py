"""The background exporter ``fss.runtime.encoder_path`` starts for a new checkpoint: once the job that
started it (in torch) has ended, it exports, verifies and caches the encoder's ONNX graph, so the next job
loads it. It waits for the job because on a 2-core machine an export beside the job slows it down even at
idle priority (shared cores, caches and memory bandwidth: docs/performance.md); then it runs at idle CPU
priority on one thread. It prints nothing: the job's own output says it started.

Usage: ``main([JOB_CHECKPOINT, CACHE_ENTRY, SIZE])``, started by ``encoder_path.EXPORTER_BOOT``; the job
checkpoint (written by the starting process into its own temporary folder) is removed once read.
"""

import os
import shutil
import sys
from pathlib import Path


def idle_priority() -> None:
    """Run only when a core is otherwise idle (Linux SCHED_IDLE), else at the lowest nice level."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main(argv: list[str]) -> int:
    """Export the job checkpoint into the cache entry (the starting process has ended: see
    ``encoder_path.EXPORTER_BOOT``, which holds this until the job's end closes its stdin)."""
    job, folder, size = Path(argv[0]), Path(argv[1]), int(argv[2])
    idle_priority()
    import torch

    from fss.checkpoint import load_model
    from fss.runtime import encoder_path

    torch.set_num_threads(1)  # ONNX Runtime's verification sessions take the same budget
    try:
        model = load_model(job)
    finally:
        shutil.rmtree(job.parent, ignore_errors=True)
    if encoder_path.cache_folder(model, size) != folder:  # the saved model would key another entry
        return 1
    with (
        encoder_path.export_lock(encoder_path.exporter_slot(folder), wait=False) as slot,
        encoder_path.export_lock(folder, wait=False) as held,
    ):
        if not (slot and held) or encoder_path.refused_marker(folder).is_file():
            return 0  # another exporter runs; a later job starts this one again
        if encoder_path.load_verified(folder, model, size, warn=False) is None:
            encoder_path.export_into_cache(model, folder, size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
