"""Head pose (yaw, pitch, roll in degrees) from the five detector landmarks.

Five points cannot give a precise pose, but they separate a frontal face from a profile well
enough for an enrollment gate or a pose-split report. The method: a rigid mean face with the five
points in 3D (its frontal projection is the ArcFace template made exactly symmetric, so an aligned
frontal face reads about 0, 0, 0), fitted to the landmarks under weak perspective (scaled
orthographic projection, accurate when the face is small against its distance to the camera). The
2x3 least-squares map from the centred 3D points to the centred 2D points is projected onto the
nearest scaled rotation (SVD), and the rotation is read as ``R = Rz(roll) @ Rx(pitch) @ Ry(yaw)``
(yaw applied first).

Axes are the image's: x to the viewer's right, y down, z towards the camera. Signs:

- yaw > 0: the nose tip moves to the viewer's right (the person turns to their own left);
- pitch > 0: the nose tip moves up in the image (the person looks up);
- roll > 0: the eye line turns clockwise on screen (the viewer's right eye lower).

The depths of the mean face (nose tip 22 mm in front of the eyes, mouth corners 2 mm behind) are
anthropometric estimates, so angles are approximate (a different depth scales ``tan(yaw)``); the
sign and the order of magnitude are what a gate needs. Landmarks in the detector's order: the
viewer's left eye, right eye, nose tip, left and right mouth corners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facerec.data.align import ARCFACE_TEMPLATE

#: mm per template pixel: the template's eyes are 35.24 px apart, an adult's about 64 mm.
_MM_PER_PX = 64.0 / float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))
_DEPTH_MM = np.array([0.0, 0.0, 22.0, -2.0, -2.0])


def _mean_face() -> np.ndarray:
    # The template made exactly left-right symmetric (it is off by a fraction of a pixel), so a
    # mirrored face reads exactly the mirrored pose.
    t = ARCFACE_TEMPLATE - ARCFACE_TEMPLATE[:2].mean(axis=0)
    mirror = t[[1, 0, 2, 4, 3]] * np.array([-1.0, 1.0])
    xy = (t + mirror) / 2 * _MM_PER_PX
    return np.column_stack([xy, _DEPTH_MM])


#: (5, 3) the mean face in mm: origin between the eyes, x right, y down, z towards the camera.
MEAN_FACE_3D = _mean_face()


@dataclass(frozen=True)
class HeadPose:
    yaw: float
    pitch: float
    roll: float

    def to_dict(self) -> dict[str, float]:
        return {"yaw": self.yaw, "pitch": self.pitch, "roll": self.roll}


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``Rz(roll) @ Rx(pitch) @ Ry(yaw)`` for angles in degrees, in the axes of the module doc."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    # Rx turns +z towards -y (up on screen) for pitch > 0: the nose rises when the head tilts back.
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def project(
    yaw: float, pitch: float, roll: float, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """The (5, 2) image landmarks of the mean face at this pose (weak perspective)."""
    pts = MEAN_FACE_3D @ rotation_matrix(yaw, pitch, roll).T
    return scale * pts[:, :2] + np.asarray(offset, dtype=np.float64)


def estimate_pose(landmarks) -> HeadPose:
    """Yaw, pitch and roll (degrees) of a face from its (5, 2) landmarks in pixels."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2) or not np.all(np.isfinite(pts)):
        raise ValueError(f"expected 5 finite (x, y) landmarks, got shape {pts.shape}")
    model = MEAN_FACE_3D - MEAN_FACE_3D.mean(axis=0)
    image = pts - pts.mean(axis=0)
    if np.linalg.norm(image) < 1e-9:
        raise ValueError("degenerate landmarks: all points coincide")
    m = np.linalg.lstsq(model, image, rcond=None)[0].T  # (2, 3): image ~= m @ model
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    rows = u @ vt  # the two orthonormal rows nearest to m's direction
    rot = np.vstack([rows, np.cross(rows[0], rows[1])])
    roll = np.arctan2(-rot[0, 1], rot[1, 1])
    c, s = np.cos(roll), np.sin(roll)
    unrolled = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) @ rot  # = Rx(pitch) @ Ry(yaw)
    yaw = np.arctan2(unrolled[0, 2], unrolled[0, 0])
    pitch = np.arctan2(unrolled[2, 1], unrolled[1, 1])
    return HeadPose(*(float(np.rad2deg(v)) for v in (yaw, pitch, roll)))


def head_poses(landmarks) -> np.ndarray:
    """(N, 3) yaw, pitch, roll in degrees for (N, 5, 2) landmarks; NaN rows where a face has
    non-finite landmarks (e.g. no face found)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (5, 2):
        raise ValueError(f"expected (N, 5, 2) landmarks, got shape {pts.shape}")
    out = np.full((len(pts), 3), np.nan)
    for i, p in enumerate(pts):
        if np.all(np.isfinite(p)) and np.linalg.norm(p - p.mean(axis=0)) > 1e-9:
            pose = estimate_pose(p)
            out[i] = pose.yaw, pose.pitch, pose.roll
    return out


def yaw_from_landmarks(landmarks) -> float:
    """The yaw alone (degrees) of one face's (5, 2) landmarks."""
    return estimate_pose(landmarks).yaw
