"""Top-k ImageNet labels for every image, to Parquet (`--task classify`).

On a cluster (the job runs from the uploaded working dir; see README "Running on a GPU cluster"):

    ray job submit --working-dir . -- python jobs/classify.py \
        --input s3://bucket/shards/ --output s3://bucket/labels/ \
        --num-gpus-per-actor 1 --actors 1,8 --batch-size 256

Takes every flag of `python -m pipeline run`.
"""

import sys
from pathlib import Path

# On a cluster the project is not installed: import it from the uploaded working dir.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import exit_process, main  # noqa: E402

if __name__ == "__main__":
    exit_process(main(["run", *sys.argv[1:]], defaults={"task": "classify"}))
