"""``facerec import --dlib``: dlib's ResNet face descriptor (ported to torch) -> a facerec model folder.

The network is ``dlib_face_recognition_resnet_model_v1.dat`` (Davis King, CC0: public domain), read
and computed without dlib by :mod:`facerec.teachers.dlib_port`. It takes a 150 x 150 RGB chip in
0..255 and gives dlib's raw 128-d descriptor. The chip is cut from the photo by the alignment
``dlib-chip-5pt-150-v1`` (:data:`facerec.data.align.DLIB_CHIP_TEMPLATE_150`: where facerec's MTCNN
landmarks fall in dlib's own chip), so the service, ``facerec align --alignment`` and everything
reading the folder's contract cut the faces dlib's network was trained on.

The port's ONNX graph (exported by the caller, ``facerec.cli.import_model``: this room does not
import the teachers) is imported as any graph that normalises inside: facerec feeds it
(x - 127.5) / 127.5 (the contract's mean and std), and two nodes in front give back x in 0..255
(x * 127.5 + 127.5), exactly what the port takes; the wrapped graph is checked against the port's
own graph before the folder is written (:func:`facerec.export.onnx_import.write_imported`).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from facerec.contract import DLIB_CHIP_150
from facerec.export.onnx_import import GraphImportError, write_imported

DLIB_NAME = "dlib_resnet_v1"
MODEL_CARD_FILE = "MODEL_CARD.md"
LICENCE = ("dlib_face_recognition_resnet_model_v1.dat by Davis King (dlib.net), released into the public "
           "domain (CC0 1.0); ported to PyTorch/ONNX by facerec.teachers.dlib_port")

MODEL_CARD = """\
# {name}

dlib's ResNet face descriptor (`dlib_face_recognition_resnet_model_v1.dat`), imported by
`facerec import --dlib` from {weights} (sha256 {digest}).

- Licence: {licence}.
- Network: dlib's `anet_type` ResNet (29 conv layers), trained by Davis King on about 3 million
  faces; 128-d descriptor, compared by cosine here (dlib itself uses Euclidean distance < 0.6).
- Input: a 150 x 150 RGB chip, alignment `{alignment}`: a similarity transform taking facerec's
  MTCNN 5 landmarks to the template measured in `benchmarks/results/dlib_port_lfw_template.json`
  (98.33% on 300 LFW validation pairs, as with dlib's own detector, landmarks and chip).
- Not calibrated: run `facerec calibrate` on an LFW tree aligned with
  `facerec align --alignment {alignment}`; until then verify requests must give a threshold.
"""


def import_dlib_graph(source: str | Path, weights: str | Path, out_dir: str | Path, *, name: str | None = None,
                      version: str | None = None) -> dict:
    """Write the model folder of the port's ONNX graph ``source`` (``export_dlib_onnx``: RGB in
    0..255, 150 x 150) made from the dlib weights file ``weights`` into ``out_dir``.

    The caller (``facerec import --dlib``) loads and exports the port: ``facerec.export`` does not
    import the teachers, which sit above it."""
    import onnx

    from facerec.export.onnx_import import detect

    source, weights = Path(source), Path(weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    model = onnx.load(str(source))
    found = replace(detect(model), normalisation="inside")  # the port takes dlib's 0..255 pixels
    if (found.input_size, found.embedding_size) != (150, 128):
        raise GraphImportError(f"{source}: not dlib's ResNet port (input {found.input_size}, "
                               f"embedding {found.embedding_size}; expected 150 and 128)")
    name = name or DLIB_NAME
    report = write_imported(
        model, found, source, out_dir, name=name, version=version or f"dlib-{digest[:12]}",
        origin=weights.name, digest=digest, alignment=DLIB_CHIP_150,
        extra={"licence": LICENCE, "descriptor": "dlib's raw 128-d descriptor (not L2-normalised)"},
    )
    report["origin"] = f"facerec import --dlib {weights.name}"
    card = Path(out_dir) / MODEL_CARD_FILE
    card.write_text(MODEL_CARD.format(name=name, weights=weights.name, digest=digest, licence=LICENCE,
                                      alignment=DLIB_CHIP_150))
    report["model_card"] = str(card)
    return report
