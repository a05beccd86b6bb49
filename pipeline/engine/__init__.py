"""The orchestrator: recipe schema and loading, sweeps, the stage graph, the runner, manifests,
run-directory names, launching (torchrun, Slurm), tracking. It knows nothing about what a stage
computes: stage modules are found by name through `kinds`."""
