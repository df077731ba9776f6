"""What both trainers share that is not the algorithm: settings checks, step counts, batches, checkpoints, progress, stop requests."""
