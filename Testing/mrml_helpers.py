"""What the Slicer-side tests share: a slicer-core scene as the application has it, and probes
that prove a run changed nothing it should not (the scene's nodes, an input's voxels)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

slicer = pytest.importorskip("slicer")

from DeepMRILib import mrml  # noqa: E402


@pytest.fixture(name="scene")
def mrml_scene() -> Iterator[Any]:
    """A fresh scene set as `slicer.mrmlScene`, with its subject hierarchy node.

    As in the Slicer application, where the scene always has one (segmentation import would
    otherwise create it here, which is not a change a run makes).
    """
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    scene.GetSubjectHierarchyNode()
    yield scene
    scene.Clear(True)


def scene_state(scene: Any) -> list[str]:
    """The ids of every node in the scene, sorted."""
    return sorted(scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes()))


def fingerprint(node: Any) -> tuple:
    """Voxel hash, geometry, name and voxel-data modification time of a volume node, to prove it
    was not modified (not even rewritten with the same values)."""
    voxels = hashlib.sha256(slicer.util.arrayFromVolume(node).tobytes()).hexdigest()
    return voxels, mrml.geometry_from_node(node), node.GetName(), node.GetImageData().GetMTime()
