"""The training loop and its components: config, loop, optimizers and schedulers, metrics and
trackers, checkpoints, sample accounting and the process group."""
