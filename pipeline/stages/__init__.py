"""Stage kinds of the pipeline package (pretrain, sft, reward, rlhf, vae, diffusion, baseline).

The registry of every kind, these and those in data_prep and eval, is `pipeline.engine.kinds`.
"""
