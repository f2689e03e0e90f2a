"""Draw detections (box, 5 landmarks, score) and the aligned 112x112 crops for a few images.

Usage: python benchmarks/detection_figure.py [IMAGE ...] --out docs/images/detections.png
Without images it uses four of the shipped sample photos plus a tight crop (pad-and-retry) and
a two-face collage (policy 'all').
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from facerec.data.align import norm_crop
from facerec.data.detect import create_detector, detect_faces
from facerec.data.image_io import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "lfw_sample"
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def default_images() -> list[tuple[str, np.ndarray]]:
    names = ["Muhammad_Ali/Muhammad_Ali_0001.jpg", "Mariah_Carey/Mariah_Carey_0002.jpg",
             "Yasser_Arafat/Yasser_Arafat_0003.jpg", "Sheryl_Crow/Sheryl_Crow_0001.jpg"]
    images = [(n.split("/")[0], load_image(SAMPLE / n)) for n in names]
    tight = load_image(SAMPLE / "David_Beckham/David_Beckham_0001.jpg")[80:175, 85:165]
    images.append(("tight crop", cv2.resize(tight, (160, 190))))
    a = load_image(SAMPLE / "Bob_Hope/Bob_Hope_0001.jpg")
    b = cv2.resize(load_image(SAMPLE / "Pete_Sampras/Pete_Sampras_0001.jpg"), (150, 150))
    canvas = np.full((250, 420, 3), 200, np.uint8)
    canvas[:, :250] = a
    canvas[50:200, 260:410] = b
    images.append(("two faces", canvas))
    return images


def panel(title: str, image: np.ndarray, detector) -> np.ndarray:
    faces = detect_faces(detector, image, policy="all")
    shown = cv2.cvtColor(image, cv2.COLOR_RGB2BGR).copy()
    crops = []
    for face in faces:
        x1, y1, x2, y2 = face.box.astype(int)
        cv2.rectangle(shown, (x1, y1), (x2, y2), (0, 200, 255), 2)
        for point, colour in zip(face.landmarks.astype(int), COLOURS):
            cv2.circle(shown, tuple(point), 3, colour, -1)
        cv2.putText(shown, f"{face.score:.3f}", (max(x1, 0), max(y1 - 4, 12)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 200, 255), 1)
        crops.append(cv2.cvtColor(norm_crop(image, face.landmarks), cv2.COLOR_RGB2BGR))
    height = 250
    scale = height / shown.shape[0]
    shown = cv2.resize(shown, (int(shown.shape[1] * scale), height))
    column = np.full((height, 120, 3), 255, np.uint8)
    for k, crop in enumerate(crops[:2]):
        column[4 + k * 122 : 116 + k * 122, 4:116] = crop
    tile = np.concatenate([shown, column], axis=1)
    header = np.full((24, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(header, f"{title}: {len(faces)} face(s)", (4, 17), cv2.FONT_HERSHEY_SIMPLEX,
                0.5, (0, 0, 0), 1)
    return np.concatenate([header, tile], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (default: shipped samples)")
    parser.add_argument("--out", default="docs/images/detections.png")
    args = parser.parse_args()
    detector = create_detector("mtcnn", backend="onnx")
    images = [(Path(p).name, load_image(p)) for p in args.images] or default_images()
    tiles = [panel(t, im, detector) for t, im in images]
    width = max(t.shape[1] for t in tiles)
    rows, row = [], []
    for tile in tiles:
        row.append(np.pad(tile, ((0, 0), (0, width - tile.shape[1]), (0, 0)), constant_values=255))
        if len(row) == 2:
            rows.append(np.concatenate(row, axis=1))
            row = []
    if row:
        row.append(np.full_like(row[0], 255))
        rows.append(np.concatenate(row, axis=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, np.concatenate(rows, axis=0))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
