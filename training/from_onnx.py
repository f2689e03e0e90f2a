"""Recover a trainable checkpoint from a facerec-exported ONNX graph (fine-tune a shipped model).

A model folder ships its fp32 graph, not its training checkpoint; to fine-tune the shipped model
(``model.init_from``) its torch weights are rebuilt from the graph:

- initialisers the exporter kept under their parameter names (``model.<name>``) are copied;
- Linear weights the exporter renamed (``val_N``, stored transposed for MatMul) are matched to the
  Linear layers in the order the forward pass calls them, which is the graph's node order;
- parameters inference never reads (the ViT's mask token) are not in the graph and keep their
  initial values (listed as ``training_only``);
- a Linear + BatchNorm1d pair that the exporter folded into one Gemm (``<fc>.weight`` and
  ``<fc>.weight_bias``) gets the folded weight, and the BatchNorm is rebuilt so that eval mode gives
  exactly the folded affine map while its running statistics are those of the layer's input on real
  images (``--images``): in training mode the batch statistics then start close to them.

The result is checked before it is written: every graph output (embedding, quality, features) of the
rebuilt torch model on the same input must match onnxruntime's (``--atol``), else nothing is written.

    python -m training.from_onnx models/default --images /data/pool112 --out /data/v11/model.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

PREFIX = "model."  # the export wrapper's attribute holding the backbone


def _linear_call_order(model: nn.Module, size: int) -> list[str]:
    """Names of the Linear layers in the order one forward pass (with features) calls them."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: order.append(n) if n not in order else None)
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, size, size), return_features=True)
    finally:
        for h in hooks:
            h.remove()
    return order


def _graph_tensors(graph_path: Path):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(graph_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # MatMul weights the exporter renamed, in node order
    anonymous = [x for node in graph.node if node.op_type == "MatMul" for x in node.input
                 if x in inits and not x.startswith(PREFIX) and inits[x].ndim == 2]
    return inits, anonymous


def _following_batchnorm(model: nn.Module, linear_name: str) -> str | None:
    """The BatchNorm1d that directly follows ``linear_name`` in its parent (fc1 -> bn1, fc2 -> bn2)."""
    parent_name, _, leaf = linear_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = [n for n, _ in parent.named_children()]
    i = names.index(leaf)
    if i + 1 < len(names) and isinstance(getattr(parent, names[i + 1]), nn.BatchNorm1d):
        return f"{parent_name}.{names[i + 1]}" if parent_name else names[i + 1]
    return None


def rebuild(model: nn.Module, graph_path: Path, calibration: torch.Tensor | None) -> dict:
    """Fill ``model`` (built with the graph's architecture) from the graph; returns a report."""
    inits, anonymous = _graph_tensors(graph_path)
    state = model.state_dict()
    filled: set[str] = set()
    report = {"named": 0, "matmul": 0, "folded": []}
    for key in state:
        name = PREFIX + key
        if name + "_bias" in inits:  # folded with the next BatchNorm: see below
            continue
        if name in inits and tuple(inits[name].shape) == tuple(state[key].shape):
            state[key] = torch.from_numpy(inits[name].copy())
            filled.add(key)
            report["named"] += 1
    folded = []
    for lin in _linear_call_order(model, model.input_size):
        w_key = f"{lin}.weight"
        if w_key in filled:
            continue
        if PREFIX + w_key + "_bias" in inits and PREFIX + w_key in inits:
            folded.append(lin)
            continue
        if not anonymous:
            raise ValueError(f"{graph_path}: no graph weight left for {lin}")
        weight = inits[anonymous.pop(0)]
        if tuple(weight.T.shape) != tuple(state[w_key].shape):
            raise ValueError(f"{graph_path}: {lin} expects {tuple(state[w_key].shape)}, next graph weight is "
                             f"{tuple(weight.shape)} transposed: not a graph of this architecture")
        state[w_key] = torch.from_numpy(weight.T.copy())
        filled.add(w_key)
        report["matmul"] += 1
    if anonymous:
        raise ValueError(f"{graph_path}: {len(anonymous)} graph weights matched no layer")
    model.load_state_dict(state, strict=True)
    for lin in folded:
        bn_name = _following_batchnorm(model, lin)
        if bn_name is None:
            raise ValueError(f"{graph_path}: {lin} was folded but no BatchNorm1d follows it")
        _unfold(model, lin, bn_name, inits[PREFIX + lin + ".weight"], inits[PREFIX + lin + ".weight_bias"],
                calibration)
        filled.update(k for k in state if k.startswith(lin + ".") or k.startswith(bn_name + "."))
        report["folded"].append([lin, bn_name])
    # Parameters inference never reads (e.g. the ViT's mask token, used only when training drops
    # patches) are not in the graph: they keep their initial values. The output check in main()
    # proves that inference does not depend on them.
    report["training_only"] = sorted(k for k in state if k not in filled and not k.endswith("num_batches_tracked"))
    return report


def _unfold(model, lin_name, bn_name, weight, bias, calibration) -> None:
    """Linear weight = folded weight; BN: eval output = W x + b exactly, running stats from data."""
    lin, bn = model.get_submodule(lin_name), model.get_submodule(bn_name)
    w = torch.from_numpy(weight.copy())
    b = torch.from_numpy(bias.copy())
    mean, std = torch.zeros_like(b), torch.ones_like(b)
    if calibration is not None:
        seen: list[torch.Tensor] = []
        hook = lin.register_forward_hook(lambda m, inp, out: seen.append(inp[0] @ w.T))
        with torch.no_grad():
            lin.weight.copy_(w)
            model.eval()(calibration)
        hook.remove()
        z = seen[0]
        mean, std = z.mean(0), z.std(0, unbiased=False).clamp_min(1e-3)  # what training-mode BN divides by
    with torch.no_grad():
        lin.weight.copy_(w)
        # eval: weight * (z - mean) / sqrt(var + eps) + bias_bn with var = std^2 - eps, weight = std
        bn.running_mean.copy_(mean)
        bn.running_var.copy_((std**2 - bn.eps).clamp_min(0.0))
        bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps))
        bn.bias.copy_(b + mean)


def _calibration_images(folder: str | None, n: int, size: int) -> torch.Tensor | None:
    if not folder:
        return None
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise FileNotFoundError(f"--images {folder}: no .jpg/.png images found")
    pick = np.random.default_rng(0).choice(len(files), size=min(n, len(files)), replace=False)
    arrays = [np.asarray(Image.open(files[i]).convert("RGB").resize((size, size))) for i in sorted(pick)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (x - 127.5) / 127.5


def check(model: nn.Module, graph_path: Path, x: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference of every graph output between onnxruntime and the torch model."""
    import onnxruntime as ort

    from facerec.export.onnx import ExportWrapper

    sess = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    wrapper = ExportWrapper(model.eval(), return_features=True)
    with torch.no_grad():
        want = wrapper(x)
    return {name: float(np.abs(g - w.numpy()).max()) for name, g, w in zip(wrapper.output_names, got, want)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.from_onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (its contract.json and fp32 graph) or an .onnx file")
    parser.add_argument("--out", required=True, help="the checkpoint to write (a trainer model.pt)")
    parser.add_argument("--images", help="aligned face images whose statistics seed the unfolded BatchNorms")
    parser.add_argument("--calibration-images", type=int, default=512, help="how many of --images")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest output difference accepted")
    args = parser.parse_args(argv)

    from facerec.bundle import ModelBundle
    from facerec.models import create_model

    bundle = ModelBundle(args.model)  # the folder's owner: which graph, which contract
    try:
        graph = bundle.graph()
        contract = bundle.contract()  # contract.json, else the graph's metadata
        overrides = (contract.extra or {}).get("overrides") or {}
        model = create_model(contract.model_name, **overrides)
        calib = _calibration_images(args.images, args.calibration_images, contract.input_size)
        report = rebuild(model, graph, calib)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m training.from_onnx: {err}", file=sys.stderr)
        return 2
    probe = calib[:8] if calib is not None else torch.randn(4, 3, contract.input_size, contract.input_size)
    diffs = check(model, graph, probe)
    report["max_abs_diff"] = diffs
    print(json.dumps(report))
    if max(diffs.values()) > args.atol:
        print(f"rebuilt model differs from {graph} by more than {args.atol}: nothing written", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_name": contract.model_name, "model_kwargs": overrides,
                "step": 0, "source_graph": str(graph), "source_contract": contract.contract_id}, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
