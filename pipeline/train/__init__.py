"""The training library: one Accelerate loop, optimizer and schedules, checkpoints, engines
(DDP, FSDP, DeepSpeed), FLOPs/MFU, objectives, EMA, export. It takes what it needs of a run
through the engine's stage context (directories, tracker, launch settings) and knows nothing
about stage kinds, data formats or Slurm."""
