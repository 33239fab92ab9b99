"""error_event: every exception becomes the one event the CLI, the worker and the panels show."""

import subprocess
import sys

import pytest
import torch

from instructx2x.errors import (
    EditCancelled,
    ErrorEvent,
    InputNotFoundError,
    InternalError,
    ModelLoadError,
    PacsError,
    ParameterError,
    ResourceError,
    error_event,
)

GPU_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"


@pytest.mark.parametrize(
    ("error", "kind", "exit_code"),
    [
        (InputNotFoundError("no file chest.png"), "InputNotFoundError", 2),
        (ParameterError("steps must be at least 1"), "ParameterError", 2),
        (ModelLoadError("not a model"), "ModelLoadError", 3),
        (ResourceError("disk full"), "ResourceError", 4),
        (PacsError("refused"), "PacsError", 5),
        (EditCancelled("stopped"), "EditCancelled", 130),
    ],
)
def test_the_librarys_errors_keep_their_kind_message_and_exit_code(error, kind, exit_code):
    assert error_event(error) == ErrorEvent(kind, str(error), exit_code)


def test_host_memory_exhaustion_is_a_resource_error():
    event = error_event(MemoryError())
    assert (event.kind, event.exit_code) == ("ResourceError", 4)
    assert "out of memory" in event.message and "smaller resolution" in event.message


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError(GPU_OOM),
        torch.cuda.OutOfMemoryError("allocator gave up"),
        RuntimeError(GPU_OOM),
    ],
)
def test_gpu_out_of_memory_is_a_resource_error_with_what_to_do(error):
    event = error_event(error)
    assert (event.kind, event.exit_code) == ("ResourceError", 4)
    assert event.message.startswith(f"out of memory on the device ({str(error).splitlines()[0]})")
    assert "smaller resolution" in event.message and "CPU" in event.message


@pytest.mark.parametrize("error", [KeyError("x"), RuntimeError("boom\nsecond line"), OSError("odd")])
def test_anything_else_is_an_internal_error_naming_its_type(error):
    event = error_event(error)
    assert (event.kind, event.exit_code) == ("InternalError", InternalError.exit_code)
    assert (
        event.message
        == f"internal error, please report it ({type(error).__name__}: {str(error).splitlines()[0]})"
    )
    assert "second line" not in event.message


def test_the_event_is_the_protocols_error_line():
    assert ErrorEvent("ResourceError", "disk full", 4).to_dict() == {
        "event": "error",
        "kind": "ResourceError",
        "message": "disk full",
        "exit_code": 4,
    }


def test_the_errors_module_does_not_load_torch():
    code = "import sys, instructx2x.errors; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
