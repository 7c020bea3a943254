"""Head pose from 68 facial landmarks (iBUG order, as dlib and insightface's 1k3d68 give them).

The generic 3D face is insightface's 68-point mean shape (``meanshape_68.pkl``, shipped in the insightface
package), in camera axes (x right, y down, z away from the camera) and levelled so that a face whose eyes
and mouth are at the same depth counts as pitch 0. ``cv2.solvePnP`` (SQPnP, the global optimum) fits it
to the inner 51 landmarks; the jaw contour is left out because under yaw it follows the silhouette.
Angles are relative to the line of sight to the face, not to the optical axis.
"""

from __future__ import annotations

import pickle
from functools import cache

import cv2
import numpy as np

from infu.face.base import HeadPose
from infu.paths import package_file

INNER_LANDMARKS = slice(17, 68)
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)
NOSE_TIP, LEFT_MOUTH, RIGHT_MOUTH = 30, 48, 54


def five_keypoints(landmarks: np.ndarray) -> np.ndarray:
    """(68, 2) iBUG landmarks -> (5, 2) ArcFace keypoints: eye centres, nose tip, mouth corners."""
    landmarks = np.asarray(landmarks, dtype=np.float32)
    return np.stack(
        [
            landmarks[LEFT_EYE].mean(axis=0),
            landmarks[RIGHT_EYE].mean(axis=0),
            landmarks[NOSE_TIP],
            landmarks[LEFT_MOUTH],
            landmarks[RIGHT_MOUTH],
        ]
    )


@cache
def generic_face_3d() -> np.ndarray:
    """(68, 3) mean face in camera axes, levelled (eye centres and mouth corners at equal depth)."""
    path = package_file("insightface", "data", "objects", "meanshape_68.pkl")
    with path.open("rb") as stream:
        mean_shape = np.asarray(pickle.load(stream), dtype=np.float64)
    face = mean_shape * np.array([1.0, 1.0, -1.0])  # insightface's z points to the viewer
    eyes = face[36:48].mean(axis=0)
    mouth = face[[LEFT_MOUTH, RIGHT_MOUTH]].mean(axis=0)
    angle = np.arctan2(-(mouth[2] - eyes[2]), mouth[1] - eyes[1])
    cos, sin = np.cos(angle), np.sin(angle)
    level = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return (face - face.mean(axis=0)) @ level.T


def _turn(yaw: float) -> np.ndarray:
    cos, sin = np.cos(yaw), np.sin(yaw)
    return np.array([[cos, 0.0, -sin], [0.0, 1.0, 0.0], [sin, 0.0, cos]])


def _nod(pitch: float) -> np.ndarray:
    cos, sin = np.cos(pitch), np.sin(pitch)
    return np.array([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]])


def rotation_to_pose(rotation: np.ndarray) -> HeadPose:
    """Yaw/pitch/roll (degrees, see :class:`HeadPose`) of a model-to-camera rotation.

    ``rotation`` = turn(yaw) @ nod(pitch) @ tilt(roll): yaw and pitch are where the nose points, roll is
    the remaining turn about the nose axis.
    """
    forward = rotation @ np.array([0.0, 0.0, -1.0])
    yaw = np.arctan2(forward[0], -forward[2])
    pitch = np.arctan2(-forward[1], np.hypot(forward[0], forward[2]))
    tilt = (_turn(yaw) @ _nod(pitch)).T @ rotation
    roll = np.arctan2(tilt[1, 0], tilt[0, 0])
    return HeadPose(*(float(np.degrees(angle)) for angle in (yaw, pitch, roll)))


def head_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> HeadPose:
    """Pose of a face from its (68, 2) landmarks in an image of ``(width, height)`` pixels."""
    width, height = image_size
    focal = float(max(width, height))
    camera = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    points = np.ascontiguousarray(np.asarray(landmarks, dtype=np.float64)[INNER_LANDMARKS, :2])
    model = np.ascontiguousarray(generic_face_3d()[INNER_LANDMARKS])
    _, rotation_vector, translation = cv2.solvePnP(model, points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    rotation, _ = cv2.Rodrigues(rotation_vector)
    return rotation_to_pose(view_rotation(translation.ravel()).T @ rotation)


def view_rotation(position: np.ndarray) -> np.ndarray:
    """Rotation turning the optical axis onto the ray to ``position`` (the face's centre).

    Pose is measured against that ray, so a face looking straight at the camera is frontal wherever it
    sits in the picture.
    """
    ray = position / np.linalg.norm(position)
    axis = np.cross([0.0, 0.0, 1.0], ray)
    sine = np.linalg.norm(axis)
    if sine < 1e-12:
        return np.eye(3)
    angle = np.arctan2(sine, ray[2])
    rotation, _ = cv2.Rodrigues(axis / sine * angle)
    return rotation
