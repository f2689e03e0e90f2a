"""Pack the best checkpoint of a run as fp16 weights + model name/kwargs + metrics (one small file)."""
import json, sys
from pathlib import Path
import torch
run, out = Path(sys.argv[1]), sys.argv[2]
ckpts = run / "checkpoints"
best = json.loads((ckpts / "best.json").read_text())
state = torch.load(ckpts / best["dir"] / "model.pt", weights_only=True, map_location="cpu")
weights = {k: (v.half() if v.is_floating_point() else v) for k, v in state["model"].items()}
torch.save({"model": weights, "model_name": state["model_name"], "model_kwargs": state["model_kwargs"],
            "step": state["step"], "epoch": state["epoch"], "best": best,
            "config": (ckpts / best["dir"] / "config.yaml").read_text()}, out)
print("packed", best, out)
