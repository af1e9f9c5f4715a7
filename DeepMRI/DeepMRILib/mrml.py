"""Conversions between MRML nodes and SimpleITK images, segmentations and transforms.

MRML keeps geometry in RAS (IJKToRAS); ITK and so the DeepMRI core use LPS, so x and y flip here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from deepmri.errors import DeepMRIError, InvalidImageError

# Multiplying an LPS vector by this gives RAS and vice versa (the flip is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4X4 = np.diag([-1.0, -1.0, 1.0, 1.0])

DEFAULT_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DEFAULT_REGION_CONTEXT = "Anatomic codes - DICOM master list"


class MRMLConversionError(DeepMRIError):
    """A node cannot be turned into an image (or back): empty, wrong kind, unsupported voxels."""


# --- geometry -------------------------------------------------------------------------------


def _ijk_to_ras(node: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def geometry_from_node(node: Any) -> tuple[tuple, tuple, tuple]:
    """The LPS (spacing, origin, direction) that SimpleITK would give the node's voxel grid."""
    ijk_to_ras = _ijk_to_ras(node)
    spacing = np.asarray(node.GetSpacing(), dtype=float)
    direction_ras = ijk_to_ras[:3, :3] / spacing
    direction_lps = LPS_TO_RAS @ direction_ras
    origin_lps = LPS_TO_RAS @ ijk_to_ras[:3, 3]
    return tuple(spacing), tuple(origin_lps), tuple(direction_lps.ravel())


def set_node_geometry(node: Any, image: sitk.Image) -> None:
    """Give a volume node the image's grid: IJKToRAS built from LPS spacing, origin, direction."""
    direction_lps = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    direction_ras = LPS_TO_RAS @ direction_lps
    matrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, direction_ras[row, column])
    node.SetIJKToRASDirectionMatrix(matrix)
    node.SetSpacing(*image.GetSpacing())
    node.SetOrigin(*(LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)))


# --- volumes --------------------------------------------------------------------------------


def image_from_volume_node(node: Any) -> sitk.Image:
    """A SimpleITK copy of a scalar volume node, with its exact geometry in LPS.

    The node is only read. Parent transforms are not applied (the image is the node's own
    voxel grid); harden the transform first if the input has been moved.

    Examples:
        >>> image = image_from_volume_node(slicer.util.getNode("MRHead"))  # doctest: +SKIP
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if node is None else node.GetClassName()
        raise MRMLConversionError(f"Expected a scalar volume node, got {kind}; select a volume.")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InvalidImageError(
            f"The volume '{node.GetName()}' has no voxels; load an image first."
        )
    if image_data.GetNumberOfScalarComponents() != 1:
        raise MRMLConversionError(
            f"The volume '{node.GetName()}' has {image_data.GetNumberOfScalarComponents()} "
            "components per voxel; DeepMRI needs a scalar (grey-value) volume."
        )
    return _image_from_any_volume(node)


def _voxels_for_vtk(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        # Slicer does not display 64-bit integer volumes; labels and counts fit in 32 bits.
        if array.size and (
            array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max
        ):
            raise MRMLConversionError("Voxel values do not fit a 32-bit integer volume.")
        return array.astype(np.int32)
    return array


def volume_node_from_image(
    image: sitk.Image,
    scene: Any,
    name: str,
    *,
    node_class: str = "vtkMRMLScalarVolumeNode",
    reference_node: Any | None = None,
) -> Any:
    """Add a new volume node holding the image with its exact geometry; returns the node.

    `reference_node` (usually the input volume) places the new node next to it in the subject
    hierarchy and hands over its parent transform, so the result overlays the input.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MRMLConversionError("Only 3D scalar images can become volume nodes.")
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    try:
        set_node_geometry(node, image)
        slicer.util.updateVolumeFromArray(node, _voxels_for_vtk(image))
        node.CreateDefaultDisplayNodes()
        if reference_node is not None:
            place_next_to(node, reference_node)
    except Exception:
        remove_nodes(scene, [node])
        raise
    return node


def labelmap_node_from_image(
    labels: sitk.Image, scene: Any, name: str, reference_node: Any | None = None
) -> Any:
    """Add a new labelmap volume node (integer labels) with the image's geometry."""
    return volume_node_from_image(
        labels,
        scene,
        name,
        node_class="vtkMRMLLabelMapVolumeNode",
        reference_node=reference_node,
    )


# --- segmentations --------------------------------------------------------------------------


def _code(value: Any) -> tuple[str, str, str]:
    """(scheme, value, meaning) from a card's code: a 3-list, a "SCT^123^Meaning" string or a dict."""
    if not value:
        return ("", "", "")
    if isinstance(value, str):
        parts = (value.split("^") + ["", "", ""])[:3]
        return (parts[0], parts[1], parts[2])
    if isinstance(value, Mapping):
        scheme = value.get("scheme", value.get("CodingSchemeDesignator", ""))
        code = value.get("value", value.get("code", value.get("CodeValue", "")))
        meaning = value.get("meaning", value.get("CodeMeaning", ""))
        return (str(scheme), str(code), str(meaning))
    scheme, code, meaning = list(value)[:3]
    return (str(scheme), str(code), str(meaning))


def terminology_entry(terminology: Mapping[str, Any] | str | None) -> str | None:
    """Slicer's terminology entry string for a card's terminology (None when there is none).

    Accepts the serialized string itself, or a dict with `category`, `type` and optionally
    `type_modifier`, `region`, `region_modifier`, `context`, `region_context`, each code given as
    [scheme, value, meaning], "scheme^value^meaning" or {scheme, value, meaning}.
    """
    if not terminology:
        return None
    if isinstance(terminology, str):
        return terminology
    if "entry" in terminology:
        return str(terminology["entry"])

    def pick(*keys: str) -> tuple[str, str, str]:
        for key in keys:
            if terminology.get(key):
                return _code(terminology[key])
        return ("", "", "")

    category, kind = pick("category"), pick("type")
    modifier = pick("type_modifier", "typeModifier")
    region = pick("region", "anatomic_region", "anatomicRegion")
    region_modifier = pick("region_modifier", "anatomicRegionModifier")
    # The serializer takes each code as (value, scheme, meaning).
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        terminology.get("context", DEFAULT_TERMINOLOGY_CONTEXT),
        category[1],
        category[0],
        category[2],
        kind[1],
        kind[0],
        kind[2],
        modifier[1],
        modifier[0],
        modifier[2],
        terminology.get("region_context", DEFAULT_REGION_CONTEXT),
        region[1],
        region[0],
        region[2],
        region_modifier[1],
        region_modifier[0],
        region_modifier[2],
    )


def segmentation_node_from_labels(
    labels: sitk.Image,
    label_info: Sequence[Mapping[str, Any]],
    scene: Any,
    name: str,
    *,
    reference_node: Any | None = None,
) -> Any:
    """Add a segmentation node with one segment per label in `label_info`, named and coloured.

    `label_info` items are the card's labels: {value, name, color [r,g,b] 0..1, terminology}.
    Labels present in the image but absent from `label_info` keep Slicer's "Label_N" name.
    A label listed but absent from the image still gets an (empty) segment, so that the
    segment list is always the model's list; `segment_id_for_label` finds a segment by value.
    """
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()  # temporary, never added to the scene
    set_node_geometry(labelmap, labels)
    slicer.util.updateVolumeFromArray(labelmap, _voxels_for_vtk(labels))
    # The module logic registers the representation converters (labelmap -> closed surface)
    # when it gets a scene, and a segmentation takes the converters there are when it is made:
    # so the logic first, or the first segmentation of a process without the desktop's
    # Segmentations module (slicer-core, scripts) can never show in 3D.
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    segmentation_node = scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", scene.GenerateUniqueName(name)
    )
    try:
        segmentation_node.CreateDefaultDisplayNodes()
        if reference_node is not None and reference_node.IsA("vtkMRMLVolumeNode"):
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise MRMLConversionError(f"Slicer could not import the labels of '{name}'.")
        _name_segments(segmentation_node, label_info)
        if reference_node is not None:
            place_next_to(segmentation_node, reference_node)
    except Exception:
        remove_nodes(scene, [segmentation_node])
        raise
    return segmentation_node


def _name_segments(segmentation_node: Any, label_info: Sequence[Mapping[str, Any]]) -> None:
    """Rename imported segments (found by label value) to the card's names, colours, terminology."""
    segmentation = segmentation_node.GetSegmentation()
    by_value = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        by_value[segmentation.GetSegment(segment_id).GetLabelValue()] = segment_id
    for info in sorted(label_info, key=lambda item: int(item["value"])):
        value = int(info["value"])
        segment_id = by_value.get(value)
        if segment_id is None:
            segment_id = segmentation.AddEmptySegment("", str(info["name"]))
            segmentation.GetSegment(segment_id).SetLabelValue(value)
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(str(info["name"]))
        if info.get("color") is not None:
            segment.SetColor(*[float(c) for c in info["color"]][:3])
        entry = terminology_entry(info.get("terminology"))
        if entry:
            segment.SetTerminology(entry)


def segment_id_for_label(segmentation_node: Any, value: int) -> str | None:
    """The id of the segment holding label `value` (ids are Slicer's own random strings)."""
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        if segmentation.GetSegment(segment_id).GetLabelValue() == int(value):
            return segment_id
    return None


def labels_from_segmentation_node(segmentation_node: Any, reference_node: Any) -> sitk.Image:
    """The segmentation as a label image on the reference volume's grid, each segment its own value.

    Segments keep the label value they were imported with (`GetLabelValue`); the scene is left as
    it was (the intermediate labelmap node is removed).
    """
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DeepMRI export")
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        segmentation = segmentation_node.GetSegmentation()
        ids = vtk.vtkStringArray()
        segmentation.GetSegmentIDs(ids)
        if not logic.ExportSegmentsToLabelmapNode(
            segmentation_node,
            ids,
            labelmap,
            reference_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        ):
            raise MRMLConversionError(
                f"Could not export '{segmentation_node.GetName()}' as labels."
            )
        exported = _image_from_any_volume(labelmap)
    finally:
        remove_nodes(scene, [labelmap])
    # Export numbers segments 1..N in list order; map back to each segment's own label value.
    values = np.zeros(ids.GetNumberOfValues() + 1, dtype=np.int32)
    for index in range(ids.GetNumberOfValues()):
        values[index + 1] = segmentation.GetSegment(ids.GetValue(index)).GetLabelValue()
    image = sitk.GetImageFromArray(values[sitk.GetArrayViewFromImage(exported).astype(np.int64)])
    image.CopyInformation(exported)
    return image


def _image_from_any_volume(node: Any) -> sitk.Image:
    """Voxels (copied) and LPS geometry of any volume node, unchecked."""
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    image = sitk.GetImageFromArray(array)
    spacing, origin, direction = geometry_from_node(node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


# --- transforms -----------------------------------------------------------------------------


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def affine_matrix_lps(transform: sitk.Transform | np.ndarray) -> np.ndarray:
    """The 4x4 homogeneous LPS matrix of a SimpleITK affine-like transform (or a 4x4 array)."""
    if isinstance(transform, np.ndarray) or isinstance(transform, (list, tuple)):
        matrix = np.asarray(transform, dtype=float)
        if matrix.shape != (4, 4):
            raise MRMLConversionError(f"An affine matrix must be 4x4, got {matrix.shape}.")
        return matrix
    if type(transform) is sitk.Transform:  # read from a file: the generic type, made specific
        transform = transform.Downcast()
    if not hasattr(transform, "GetMatrix") and transform.IsLinear():
        # A translation or another linear transform without a matrix: sample it at the origin
        # and the unit points.
        origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
        matrix = np.eye(4)
        for axis in range(3):
            unit = tuple(float(axis == index) for index in range(3))
            matrix[:3, axis] = np.asarray(transform.TransformPoint(unit)) - origin
        matrix[:3, 3] = origin
        return matrix
    try:
        linear = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
        translation = np.asarray(transform.GetTranslation(), dtype=float)
        center = np.asarray(transform.GetCenter(), dtype=float)
    except AttributeError as error:
        raise MRMLConversionError(
            f"{transform.GetName()} is not a linear transform; use a displacement field instead."
        ) from error
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    # ITK applies y = A (x - c) + c + t.
    matrix[:3, 3] = translation + center - linear @ center
    return matrix


def linear_transform_node_from_affine(
    transform: sitk.Transform | np.ndarray,
    scene: Any,
    name: str,
    *,
    from_parent: bool = True,
    reference_node: Any | None = None,
) -> Any:
    """Add a linear transform node from an ITK (LPS) affine transform or 4x4 LPS matrix.

    ITK registration returns the *resampling* transform: it maps points of the fixed image to
    the moving image. Slicer calls that the transform "from parent", so with the default
    `from_parent=True` the moving volume placed under the new node lines up with the fixed one.
    Pass `from_parent=False` for a transform that moves points of the child to the parent.
    """
    matrix_ras = LPS_TO_RAS_4X4 @ affine_matrix_lps(transform) @ LPS_TO_RAS_4X4
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName(name))
    if from_parent:
        node.SetMatrixTransformFromParent(_vtk_matrix(matrix_ras))
    else:
        node.SetMatrixTransformToParent(_vtk_matrix(matrix_ras))
    if reference_node is not None:
        place_next_to(node, reference_node)
    return node


def grid_transform_node_from_displacement(
    displacement: sitk.Image,
    scene: Any,
    name: str,
    *,
    from_parent: bool = True,
    reference_node: Any | None = None,
) -> Any:
    """Add a grid transform node from an ITK displacement field (3-vector image, LPS mm).

    The field's vectors and grid geometry are converted to RAS. As for affines, an ITK field from
    registration maps fixed points to moving points, which Slicer stores "from parent".
    """
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise MRMLConversionError(
            "A displacement field must be a 3D image with 3 components per voxel (x, y, z in mm)."
        )
    vectors_lps = sitk.GetArrayFromImage(displacement).astype(np.float64)  # (k, j, i, 3)
    vectors_ras = vectors_lps * np.array([-1.0, -1.0, 1.0])
    grid = vtk.vtkImageData()
    grid.SetDimensions(displacement.GetSize())
    grid.SetSpacing(displacement.GetSpacing())
    grid.SetOrigin(LPS_TO_RAS @ np.asarray(displacement.GetOrigin(), dtype=float))
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    from vtk.util import numpy_support

    target = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())
    target[:] = vectors_ras.reshape(-1, 3)
    direction_ras = LPS_TO_RAS @ np.asarray(displacement.GetDirection(), dtype=float).reshape(3, 3)
    direction = np.eye(4)
    direction[:3, :3] = direction_ras
    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(grid)
    grid_transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    grid_transform.SetInterpolationModeToLinear()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    if from_parent:
        node.SetAndObserveTransformFromParent(grid_transform)
    else:
        node.SetAndObserveTransformToParent(grid_transform)
    if reference_node is not None:
        place_next_to(node, reference_node)
    return node


def transform_from_node(node: Any) -> sitk.Transform:
    """A SimpleITK (LPS) transform from a linear or grid transform node: the node's from-parent
    transform, which is how `linear_transform_node_from_affine` and
    `grid_transform_node_from_displacement` store registration results (fixed -> moving points).

    Examples:
        >>> transform = transform_from_node(slicer.util.getNode("T1 to T2"))  # doctest: +SKIP
    """
    if node is not None and node.IsA("vtkMRMLLinearTransformNode"):
        matrix = vtk.vtkMatrix4x4()
        node.GetMatrixTransformFromParent(matrix)
        lps = LPS_TO_RAS_4X4 @ slicer.util.arrayFromVTKMatrix(matrix) @ LPS_TO_RAS_4X4
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(tuple(lps[:3, :3].ravel()))
        affine.SetTranslation(tuple(lps[:3, 3]))
        return affine
    if node is not None and node.IsA("vtkMRMLGridTransformNode"):
        return sitk.DisplacementFieldTransform(_displacement_from_grid_node(node))
    kind = "nothing" if node is None else node.GetClassName()
    raise MRMLConversionError(f"Expected a linear or grid transform node, got {kind}.")


def _displacement_from_grid_node(node: Any) -> sitk.Image:
    grid_transform = node.GetTransformFromParent()
    if grid_transform is None or not grid_transform.IsA("vtkOrientedGridTransform"):
        raise MRMLConversionError(
            f"The transform '{node.GetName()}' holds no displacement grid from its parent; "
            "convert it to a grid transform in the Transforms module first."
        )
    grid = grid_transform.GetDisplacementGrid()
    from vtk.util import numpy_support

    size = grid.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).astype(np.float64)
    scale, shift = grid_transform.GetDisplacementScale(), grid_transform.GetDisplacementShift()
    vectors = vectors * scale + shift
    vectors = vectors.reshape(size[2], size[1], size[0], 3) * np.array([-1.0, -1.0, 1.0])
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.SetSpacing(grid.GetSpacing())
    field.SetOrigin(tuple(LPS_TO_RAS @ np.asarray(grid.GetOrigin(), dtype=float)))
    direction_ras = slicer.util.arrayFromVTKMatrix(grid_transform.GetGridDirectionMatrix())[:3, :3]
    field.SetDirection(tuple((LPS_TO_RAS @ direction_ras).ravel()))
    return field


def transform_node_from_transform(
    transform: sitk.Transform,
    scene: Any,
    name: str,
    *,
    reference_image: sitk.Image | None = None,
    reference_node: Any | None = None,
) -> Any:
    """Add a linear transform node for an affine-like transform, a grid transform node otherwise.

    A displacement-field transform keeps its own grid; any other non-linear transform (a
    B-spline, a composite) is sampled as a displacement field on `reference_image`'s grid.
    """
    try:
        affine_matrix_lps(transform)
    except (MRMLConversionError, RuntimeError, TypeError):
        pass
    else:
        return linear_transform_node_from_affine(
            transform, scene, name, reference_node=reference_node
        )
    if isinstance(transform, sitk.DisplacementFieldTransform):
        field = transform.GetDisplacementField()
    elif reference_image is not None:
        field = sitk.TransformToDisplacementField(
            transform,
            sitk.sitkVectorFloat64,
            reference_image.GetSize(),
            reference_image.GetOrigin(),
            reference_image.GetSpacing(),
            reference_image.GetDirection(),
        )
    else:
        raise MRMLConversionError(
            f"The transform '{name}' is not linear and there is no image grid to sample it on."
        )
    return grid_transform_node_from_displacement(field, scene, name, reference_node=reference_node)


# --- scene helpers --------------------------------------------------------------------------


def output_name(input_node: Any, what: str, model_id: str | None = None) -> str:
    """A readable output name: "MRHead segmentation (brain tissue)"."""
    base = input_node.GetName() if input_node is not None else "DeepMRI"
    suffix = f" ({model_id.replace('-', ' ').replace('_', ' ')})" if model_id else ""
    return f"{base} {what}{suffix}"


def place_next_to(node: Any, reference_node: Any) -> None:
    """Put `node` under the same subject hierarchy parent as `reference_node` (a study, a folder).

    In the Slicer app every node has a subject hierarchy item; where the reference has none
    (a bare MRML scene) nothing is done.
    """
    hierarchy = _existing_hierarchy(node.GetScene())
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if not reference_item:
        return
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)


def _existing_hierarchy(scene: Any) -> Any | None:
    """The scene's subject hierarchy node if it has one (asking the scene would create one)."""
    if scene is None:
        return None
    return scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")


def remove_nodes(scene: Any, nodes: Iterable[Any]) -> None:
    """Remove nodes (and their display/storage nodes) so a failed run leaves the scene as it was."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        for index in range(
            node.GetNumberOfDisplayNodes() if node.IsA("vtkMRMLDisplayableNode") else 0
        ):
            display = node.GetNthDisplayNode(index)
            if display is not None:
                scene.RemoveNode(display)
        if node.IsA("vtkMRMLStorableNode"):
            storage = node.GetStorageNode()
            if storage is not None:
                scene.RemoveNode(storage)
        hierarchy = _existing_hierarchy(scene)
        item = hierarchy.GetItemByDataNode(node) if hierarchy is not None else 0
        scene.RemoveNode(node)
        if item and hierarchy.GetItemByDataNode(node) == item:
            hierarchy.RemoveItem(item, False, False)
