"""Names inside a run directory, the contract between stages (../shared/DESIGN.md):

<run_dir>/recipe.yaml               the resolved recipe every process reads
<run_dir>/run.lock                  held (flock) by the one `pipeline run`/`submit` using the dir
<run_dir>/<stage>/stage.json        manifest
<run_dir>/<stage>/summary.json      summary metrics (headline, note)
<run_dir>/<stage>/metrics.jsonl     one JSON object per logged step
<run_dir>/<stage>/stage.log         the stage's log (every rank's warnings, rank 0's info)
<run_dir>/<stage>/checkpoints/      resumable state (.tmp_*: a save in progress, never loaded)
<run_dir>/<stage>/export/           the hand-off to later stages and to other tools
<run_dir>/<stage>/errors/           rank<N>.json: a failed rank's report to the orchestrator
<run_dir>/<stage>/slurm/            rendered sbatch files and job logs
<run_dir>/<stage>/stop.request      present while the launcher asks the ranks to stop at a step
"""

RECIPE_FILE = "recipe.yaml"
LOCK_FILE = "run.lock"
MANIFEST_FILE = "stage.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "stage.log"
CHECKPOINTS_DIR = "checkpoints"
PARTIAL_CHECKPOINT_PREFIX = ".tmp_"  # checkpoints/.tmp_<name>: written, not yet renamed to <name>
EXPORT_DIR = "export"
ERRORS_DIR = "errors"
SLURM_DIR = "slurm"
STOP_FILE = "stop.request"
