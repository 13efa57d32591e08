"""The baseline: the plain PyTorch loop a user would write instead of this pipeline.

One process, PIL plus torchvision's own preset, batches of 64, the model on every core,
features to one Parquet file.

    python bench/plain_loop.py --input DIR --output features.parquet [--model resnet50] [--precision fp32]
"""

import argparse
import glob
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision import models
from torchvision.transforms._presets import ImageClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.models import SplitClassifier  # noqa: E402  (the fc head split off, as everywhere)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()

    torch.set_num_threads(os.cpu_count())
    model = SplitClassifier(models.get_model(args.model, weights=None)).eval()
    preprocess = ImageClassification(crop_size=224, resize_size=256)
    paths = sorted(glob.glob(os.path.join(args.input, "*.jpg")))
    ids, feats = [], []
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"),
    ):
        for i in range(0, len(paths), args.batch_size):
            batch = paths[i : i + args.batch_size]
            x = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in batch])
            feats.append(model.features(x).float())
            ids += [os.path.basename(path) for path in batch]
    emb = torch.cat(feats).numpy()
    table = pa.table(
        {"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(emb.reshape(-1), emb.shape[1])}
    )
    pq.write_table(table, args.output, compression="zstd")
    print(f"{len(ids)} images")


if __name__ == "__main__":
    main()
