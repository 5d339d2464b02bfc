"""The training engine: the shared loop, checkpoints, devices, distributed runs, Hydra glue and run records."""
