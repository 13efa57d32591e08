"""Nightly incremental feature extraction: only new or changed shards, exactly once.

    python jobs/nightly_features.py --input s3://bucket/shards/ --output s3://bucket/features/ \
        [--date YYYY-MM-DD] [--max-error-fraction 0.01] [any pipeline flag]

On a cluster (see README "Nightly runs" for cron and KubeRay):

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/nightly_features.py --input s3://bucket/shards/ --output s3://bucket/features/ \
        --num-gpus-per-actor 1 --actors 1,8 --batch-size 256

Rows go to <output>/dt=<date>/; <output>/_state/ keeps what is done. Exit codes: 0 done
(or nothing new), 1 the run failed, 2 bad arguments or input, 3 over the error budget.
"""

import sys
from pathlib import Path

# On a cluster the project is not installed: import it from the uploaded working dir.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import exit_process, main  # noqa: E402

if __name__ == "__main__":
    exit_process(main(["nightly", *sys.argv[1:]], defaults={"task": "features"}))
