"""The training library: one Accelerate loop, optimizer and schedules, checkpoints, engines
(DDP, FSDP, DeepSpeed), FLOPs/MFU, objectives, rewards. It knows nothing about recipes or Slurm."""
