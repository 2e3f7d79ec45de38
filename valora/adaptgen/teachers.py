"""Teachers: small specialist models whose predictions label images nobody labelled, so that their knowledge is
fused into an adapter (the paper's "labels produced by existing small models").

A teacher learns from the true labels of a share of the training images only (`labelled`) and labels the rest;
the adapter then trains on the teacher's labels (and, for head tasks, distils its class probabilities). Validation
and held-out images keep their true labels, so what is measured is what the adapter learnt, teacher errors included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from valora.adaptgen.datasets import Examples
from valora.adaptgen.spec import TeacherSpec

FEATURE_SIDE = 16


def features(images: list[Image.Image]) -> np.ndarray:
    """Grey levels of each image at 16x16, in [0, 1]: what a small pixel classifier sees."""
    return np.stack([np.asarray(img.convert("L").resize((FEATURE_SIDE, FEATURE_SIDE), Image.BILINEAR),
                                dtype=np.float32).ravel() / 255.0 for img in images])


@dataclass
class TeacherReport:
    labelled: int  # training images whose true labels the teacher saw
    relabelled: int  # training images labelled by the teacher
    agreement: float  # share of its labels that match the truth (for the report only; never used to train)


def apply_teacher(spec: TeacherSpec, train: Examples, num_classes: int, seed: int) -> tuple[Examples, TeacherReport]:
    """`train` with every image outside the labelled share relabelled by a teacher fitted on that share."""
    from sklearn.linear_model import LogisticRegression

    n = len(train)
    order = np.random.default_rng(seed).permutation(n)
    known = np.sort(order[: max(num_classes, int(round(n * spec.labelled)))])
    x = features(train.images)
    y = np.asarray(train.targets)
    model = LogisticRegression(max_iter=2000, C=1.0).fit(x[known], y[known])
    probs = np.zeros((n, num_classes), dtype=np.float32)
    probs[:, model.classes_] = model.predict_proba(x)
    probs[known] = np.eye(num_classes, dtype=np.float32)[y[known]]
    targets = probs.argmax(-1)
    unknown = np.setdiff1d(np.arange(n), known)
    report = TeacherReport(len(known), len(unknown), float((targets[unknown] == y[unknown]).mean()))
    return Examples(train.images, targets.tolist(), probs), report
