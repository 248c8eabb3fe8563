"""Which CUDA errors leave a device unusable.

After a kernel faults (an illegal address, say) the CUDA context is in a
"sticky" error state: every later call in that process fails with the same
error, so the only cure is a new process.  Other errors (a bad launch
configuration, out of memory) fail one call and leave the context usable.
The numbers are the same in the runtime (``cudaError_t``) and the driver
(``CUresult``) APIs, which is why one table serves both.
"""

from __future__ import annotations

#: Sticky error codes and the names CUDA, CuPy and RMM messages use for them.
STICKY_ERRORS: dict[int, tuple[str, ...]] = {
    214: ("cudaErrorECCUncorrectable", "CUDA_ERROR_ECC_UNCORRECTABLE"),
    700: ("cudaErrorIllegalAddress", "CUDA_ERROR_ILLEGAL_ADDRESS"),
    702: ("cudaErrorLaunchTimeout", "CUDA_ERROR_LAUNCH_TIMEOUT"),
    709: ("cudaErrorContextIsDestroyed", "CUDA_ERROR_CONTEXT_IS_DESTROYED"),
    710: ("cudaErrorAssert", "CUDA_ERROR_ASSERT"),
    714: ("cudaErrorHardwareStackError", "CUDA_ERROR_HARDWARE_STACK_ERROR"),
    715: ("cudaErrorIllegalInstruction", "CUDA_ERROR_ILLEGAL_INSTRUCTION"),
    716: ("cudaErrorMisalignedAddress", "CUDA_ERROR_MISALIGNED_ADDRESS"),
    717: ("cudaErrorInvalidAddressSpace", "CUDA_ERROR_INVALID_ADDRESS_SPACE"),
    718: ("cudaErrorInvalidPc", "CUDA_ERROR_INVALID_PC"),
    719: ("cudaErrorLaunchFailure", "CUDA_ERROR_LAUNCH_FAILED"),
    911: ("cudaErrorExternalDevice", "CUDA_ERROR_EXTERNAL_DEVICE"),
}
_STICKY_NAMES = tuple(n for names in STICKY_ERRORS.values() for n in names)


def is_sticky_fault(exc: BaseException, cuda_error_types: tuple[type, ...]) -> bool:
    """Whether ``exc`` reports a sticky CUDA fault.

    ``cuda_error_types`` are the exception classes carrying a numeric
    ``status`` (CuPy's ``CUDARuntimeError`` and ``CUDADriverError``).  RMM
    reports CUDA failures as a plain ``RuntimeError`` whose message names
    the error, so those are recognized by name.
    """
    if cuda_error_types and isinstance(exc, cuda_error_types):
        status = getattr(exc, "status", None)
        if isinstance(status, int) and not isinstance(status, bool):
            return status in STICKY_ERRORS
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(name in text for name in _STICKY_NAMES)
    return False
