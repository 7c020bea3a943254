"""A face stack asked for CUDA that gets only CPU says why, loudly, or fails when a GPU is required."""

from __future__ import annotations

import logging

import onnxruntime
import pytest
import torch

from infu.face import FaceConfig, load_face_analyzer
from infu.face.arcface_ir_se50 import torch_device
from infu.face.providers import (
    CUDA,
    GpuUnavailableError,
    check_install,
    check_session_providers,
    installed_onnxruntime_builds,
    select_providers,
)
from infu.face.tiny_models import write_tiny_pack

CPU = "CPUExecutionProvider"
pytestmark = pytest.mark.skipif(
    CUDA in onnxruntime.get_available_providers() or torch.cuda.is_available(),
    reason="this machine offers CUDA: nothing falls back",
)


@pytest.fixture
def gpu_build_also_installed(tmp_path, monkeypatch):
    """An onnxruntime-gpu distribution beside the CPU one, as `pip install .[gpu]` leaves it."""
    dist_info = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_cuda_asked_on_a_cpu_build_warns_naming_the_install(caplog):
    with caplog.at_level(logging.WARNING, logger="infu.face.providers"):
        assert select_providers([CUDA, CPU]) == [CPU]
    (record,) = caplog.records
    assert "runs on CPU although CUDA was asked for" in record.message
    assert "only the CPU build" in record.message and "make install MACHINE=gpu" in record.message


def test_providers_onnxruntime_lacks_are_skipped_and_none_left_is_an_error():
    assert select_providers([CUDA, CPU]) == [CPU]
    with pytest.raises(RuntimeError, match=f"none of the face providers \\['{CUDA}'\\]"):
        select_providers([CUDA])


def test_cpu_only_request_is_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger="infu.face.providers"):
        assert select_providers([CPU]) == [CPU]
    assert caplog.records == []


def test_require_gpu_fails_instead(gpu_build_also_installed):
    with pytest.raises(GpuUnavailableError, match="CPU build shadows the GPU one.*require_gpu"):
        select_providers([CUDA, CPU], require_gpu=True)


def test_both_builds_installed_are_detected(gpu_build_also_installed):
    assert installed_onnxruntime_builds() == ["onnxruntime", "onnxruntime-gpu"]
    with pytest.raises(SystemExit, match=r"expected \['onnxruntime'\] only, found .*onnxruntime-gpu"):
        check_install("cpu")


def test_install_check_names_this_machine_kind():
    assert check_install("cpu").startswith("cpu install: onnxruntime ")
    with pytest.raises(SystemExit, match="make install MACHINE=gpu"):
        check_install("gpu")


def test_a_session_that_fell_back_to_cpu_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="infu.face.providers"):
        check_session_providers("detector", [CPU], [CUDA, CPU], require_gpu=False)
        check_session_providers("detector", [CUDA, CPU], [CUDA, CPU], require_gpu=False)
    assert len(caplog.records) == 1 and "detector (session providers ['CPUExecutionProvider'])" in caplog.text
    with pytest.raises(GpuUnavailableError):
        check_session_providers("detector", [CPU], [CUDA, CPU], require_gpu=True)


def test_face_stacks_asked_for_cuda_say_so_or_fail(tmp_path, caplog):
    """The insightface analyzer (tiny pack) and the torch IR-SE50 recognizer, each asked for CUDA here."""
    pack = write_tiny_pack(tmp_path)
    config = FaceConfig(
        backend="insightface",
        model_root=pack,
        pack_name="tinypack",
        recognizer="glintr100",
        providers=[CUDA, CPU],
    )
    with caplog.at_level(logging.WARNING, logger="infu.face.providers"):
        assert load_face_analyzer(config).providers == [CPU]
        assert torch_device(config) == torch.device("cpu")
    onnx_warning, torch_warning = (record.message for record in caplog.records)
    assert onnx_warning.startswith("onnxruntime (providers") and "only the CPU build" in onnx_warning
    assert torch_warning.startswith("the arcface_ir_se50 recognizer (torch) runs on CPU")
    required = config.model_copy(update={"require_gpu": True})
    with pytest.raises(GpuUnavailableError):
        load_face_analyzer(required)
    with pytest.raises(GpuUnavailableError, match="torch"):
        torch_device(required)
