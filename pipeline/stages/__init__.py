"""Training stage kinds of the pipeline package: pretrain, sft, reward, rlhf, vae, diffusion,
plus what the TRL-trained ones share (`posttrain`: data, base model, trainer wiring, export;
`rewards`: verifiable reward functions).

The `baseline` kind lives with its tasks, in `pipeline.baselines.stage`. The registry of every
kind, these and those in data_prep, eval and baselines, is `pipeline.engine.kinds`.
"""
