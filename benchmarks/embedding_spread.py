"""How spread out a model's embeddings are: a quick check for feature collapse.

For each checkpoint, embeds a fixed sample of aligned images and prints the mean cosine between
different images, the length of the mean unit embedding (0 = spread evenly, 1 = all one direction),
the mean raw embedding norm and how many principal directions hold 90% of the variance; and, with the
folder names as identities, the mean cosine of different-identity pairs and the fraction of them above
0.9 (``facerec.eval.spread.pair_collapse``: ~0 for a healthy embedding).

    python benchmarks/embedding_spread.py RUN_DIR/checkpoints/step_00001560 ... --images /data/lfw112 \
        [--every 20 --limit 4000] [--out benchmarks/results/embedding_spread.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from facerec.eval.spread import COLLAPSE_COSINE, pair_collapse, spread


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint folders or model files")
    ap.add_argument("--images", required=True, help="aligned image tree (<person>/<image>)")
    ap.add_argument("--every", type=int, default=20, help="take every n-th image of the sorted list")
    ap.add_argument("--limit", type=int, default=4000, help="look at the first n images of the sorted list")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)

    from facerec.data.datasets import read_rgb
    from facerec.eval.ood_study.families import to_input
    from facerec.export.torch_artifact import load_model_file

    files = sorted(p for p in Path(args.images).glob("*/*") if p.suffix.lower() in {".jpg", ".png"})
    files = files[: args.limit : args.every]
    if len(files) < 2:
        raise SystemExit(f"{args.images}: fewer than two images")
    x = to_input(np.stack([read_rgb(p) for p in files]))
    names = sorted({p.parent.name for p in files})
    labels = torch.tensor([names.index(p.parent.name) for p in files])
    out = {}
    for ckpt in args.checkpoints:
        path = Path(ckpt)
        model = load_model_file(path / "model.pt" if path.is_dir() else path).model.eval()
        with torch.no_grad():
            emb = torch.cat([model(x[i : i + 64]).embedding for i in range(0, len(x), 64)])
        out[ckpt] = spread(emb)
        impostor_cos, collapsed = pair_collapse(emb, labels).tolist()
        out[ckpt].update({"impostor_mean_cosine": impostor_cos,
                          f"impostor_pairs_above_{COLLAPSE_COSINE}": collapsed})
        print(ckpt, json.dumps(out[ckpt]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
