"""ONNX Runtime sessions and the choice of execution providers.

`providers: auto` tries TensorRT, then CUDA, then the CPU, and says in one
log line which were chosen and why a GPU provider was not (no driver,
missing CUDA libraries). A provider named explicitly that cannot be used is
a `ProviderError` at start: ONNX Runtime would otherwise fall back to the
CPU silently.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import onnxruntime as ort

from kiosk.errors import ProviderError

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ALIASES = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}
SHORT = {v: k for k, v in ALIASES.items()}
_PROVIDER_LIBS = {TENSORRT: "libonnxruntime_providers_tensorrt.so", CUDA: "libonnxruntime_providers_cuda.so"}

# ONNX Runtime's own warnings (e.g. a failed provider library) are replaced by
# our one-line summary; errors inside a run still raise as exceptions.
ort.set_default_logger_severity(3)


@dataclass
class ProviderPlan:
    """The providers to ask ONNX Runtime for, and why others were left out."""

    providers: list[str]
    explicit: bool
    skipped: dict[str, str] = field(default_factory=dict)


@cache
def gpu_unavailable_reason(provider: str) -> str | None:
    """Why `provider` cannot run here, or None when its libraries load.

    Loading the provider's shared library with ctypes names the first
    missing dependency (e.g. libcublasLt.so.13), which is the reason an
    operator needs; ONNX Runtime itself prints a multi-line warning instead.
    """
    if provider not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no {SHORT.get(provider, provider)} provider"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver found (libcuda.so.1 cannot be loaded)"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # CUDA/cuDNN wheels from PyPI (the `gpu` extra), if installed
        try:
            preload(directory="")
        except Exception as exc:  # noqa: BLE001 - diagnostic only
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    lib = Path(ort.__file__).parent / "capi" / _PROVIDER_LIBS[provider]
    try:
        ctypes.CDLL(str(lib), mode=getattr(os, "RTLD_LAZY", 1) | ctypes.RTLD_GLOBAL)
    except OSError as exc:
        parts = [s.strip() for s in str(exc).split(":")]
        if "cannot open shared object file" in parts:
            return (
                f"its libraries cannot be loaded ({parts[parts.index('cannot open shared object file') - 1]} missing)"
            )
        return f"its libraries cannot be loaded ({exc})"
    return None


def plan_providers(spec: str | list[str]) -> ProviderPlan:
    """Turn `models.providers` into the list handed to ONNX Runtime."""
    if isinstance(spec, str) and spec.lower() == "auto":
        chosen, skipped = [], {}
        for prov in (TENSORRT, CUDA):
            reason = gpu_unavailable_reason(prov)
            if reason is None:
                chosen.append(prov)
            else:
                skipped[prov] = reason
        return ProviderPlan(providers=chosen + [CPU], explicit=False, skipped=skipped)
    names = [spec] if isinstance(spec, str) else list(spec)
    providers = [ALIASES[n.lower()] for n in names]
    for prov in providers:
        if prov != CPU:
            reason = gpu_unavailable_reason(prov)
            if reason is not None:
                raise ProviderError(f"models.providers: {SHORT[prov]} was asked for but cannot be used: {reason}")
    return ProviderPlan(providers=providers, explicit=True)


def _provider_options(prov: str, cache_dir: Path | None) -> dict[str, str]:
    if prov == TENSORRT and cache_dir is not None:
        trt_dir = cache_dir / "tensorrt"
        trt_dir.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(trt_dir), "trt_fp16_enable": "True"}
    if prov == CUDA:
        return {"cudnn_conv_algo_search": "HEURISTIC"}
    return {}


def create_session(
    model: bytes, name: str, plan: ProviderPlan, *, threads: int = 0, cache_dir: Path | None = None
) -> ort.InferenceSession:
    """A session over `model` (serialized ONNX), checked against the plan."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Idle ONNX Runtime threads spinning between calls steal the cores that
    # decoding, alignment and the other processes need (measured on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [(p, _provider_options(p, cache_dir)) for p in plan.providers]
    try:
        session = ort.InferenceSession(model, sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types
        if plan.explicit:
            raise ProviderError(f"{name}: cannot create a session on {plan.providers}: {exc}") from None
        raise
    got = session.get_providers()
    missing = [p for p in plan.providers if p not in got]
    if missing and plan.explicit:
        raise ProviderError(
            f"{name}: providers {[SHORT.get(p, p) for p in missing]} were asked for "
            "but ONNX Runtime could not initialise them"
        )
    for prov in missing:
        plan.skipped.setdefault(prov, "ONNX Runtime could not initialise it")
    return session


def describe(plan: ProviderPlan, chosen: list[str]) -> str:
    """One line: the providers in use and why the GPU ones are not."""
    text = "providers: " + ", ".join(SHORT.get(p, p) for p in chosen)
    if plan.skipped:
        text += " (" + "; ".join(f"{SHORT.get(p, p)} unavailable: {r}" for p, r in plan.skipped.items()) + ")"
    return text
