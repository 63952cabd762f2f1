"""GPU interop for the loss-region analysis: cupy (imported lazily), zero-copy torch <-> cupy views by
DLPack, a guard that proves a block of GPU work copies nothing to the host, and loading the CUDA
kernels under ``kernels/`` with ``cupy.RawModule``.

Kernels load from a prebuilt cubin for the device's architecture when one is found (in
``$SAGE_FAST_CUBIN_DIR``, then in the package's ``_cubins`` folder), otherwise they are compiled with
NVRTC from the ``.cu`` source (found in ``$SAGE_FAST_KERNEL_DIR``, the package's ``_kernels`` folder,
or the source tree's ``kernels/`` folder beside the package).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
GPU_EXTRA_HINT = "pip install 'sage-fast[gpu]' (CUDA 12) or 'sage-fast[gpu-cu13]' (CUDA 13)"


# ------------------------------------------------------------------------- cupy


def cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None


def import_cupy():
    """cupy, or an ImportError that says which extra installs it."""
    try:
        return importlib.import_module("cupy")
    except ImportError as err:
        raise ImportError(f"the GPU kNN kernels need cupy, which is not installed ({err}); {GPU_EXTRA_HINT}") from err


@contextlib.contextmanager
def cuda_errors_explained(what: str):
    """cupy imports without a GPU and fails at its first allocation or launch with a CUDARuntimeError
    (a RuntimeError); say what was being attempted instead of a bare CUDA error code."""
    try:
        yield
    except RuntimeError as err:
        if type(err).__module__.startswith("cupy") or "cuda" in type(err).__name__.lower():
            raise RuntimeError(f"{what} failed in CUDA ({type(err).__name__}: {err}); is a CUDA device visible "
                               "and does the installed cupy match its driver?") from err
        raise


# ---------------------------------------------------------------- zero-copy views


def as_cupy(tensor: torch.Tensor):
    """A cupy array sharing ``tensor``'s device memory (DLPack, no copy)."""
    if tensor.device.type != "cuda":
        raise ValueError(f"tensor must be a CUDA tensor to view it from cupy, got device {tensor.device}")
    cupy = import_cupy()
    with cuda_errors_explained("viewing a torch tensor from cupy"):
        array = cupy.from_dlpack(tensor)
    assert_same_memory(tensor, array)
    return array


def as_torch(array) -> torch.Tensor:
    """A torch tensor sharing a cupy array's device memory (DLPack, no copy)."""
    tensor = torch.from_dlpack(array)
    assert_same_memory(tensor, array)
    return tensor


def assert_same_memory(tensor: torch.Tensor, array) -> None:
    """Raises AssertionError unless ``tensor`` and the cupy ``array`` are views of the same device memory."""
    tensor_ptr, array_ptr = tensor.data_ptr(), int(array.data.ptr)
    if tensor_ptr != array_ptr or tensor.device.type != "cuda" or tensor.device.index != array.device.id:
        raise AssertionError(f"torch tensor (ptr {tensor_ptr:#x}, {tensor.device}) and cupy array "
                             f"(ptr {array_ptr:#x}, cuda:{array.device.id}) do not share memory: a copy was made")


@contextlib.contextmanager
def no_host_transfers(allowed: int = 0):
    """Fails (AssertionError) if the block copies from a CUDA device to the host more than ``allowed``
    times. Counts the device-to-host memcpy activity the CUDA profiler records for the whole process,
    so it sees torch and cupy alike."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "memcpy" in e.name.lower() and "dtoh" in e.name.lower()]
    if len(copies) > allowed:
        raise AssertionError(f"{len(copies)} device-to-host copies where at most {allowed} were allowed: {copies[:5]}")


# ---------------------------------------------------------------- kernel modules


def cubin_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("SAGE_FAST_CUBIN_DIR"):
        dirs.append(Path(os.environ["SAGE_FAST_CUBIN_DIR"]))
    dirs.append(_PACKAGE_DIR / "_cubins")
    # An editable install (scikit-build-core) imports the package from the source tree but installs the
    # CMake-built cubins into site-packages; the package's __path__ lists both folders.
    package = importlib.import_module("sage_fast")
    for entry in getattr(package, "__path__", []):
        folder = Path(entry).resolve() / "_cubins"
        if folder not in dirs:
            dirs.append(folder)
    return dirs


def kernel_source_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("SAGE_FAST_KERNEL_DIR"):
        dirs.append(Path(os.environ["SAGE_FAST_KERNEL_DIR"]))
    dirs += [_PACKAGE_DIR / "_kernels", _PACKAGE_DIR.parent / "kernels"]
    return dirs


def find_cubin(stem: str, capability: tuple[int, int]) -> Path | None:
    """The cubin built for this architecture, or for the newest older minor of the same major (cubins
    run on later minors of their major, never across majors)."""
    major, minor = capability
    for folder in cubin_dirs():
        for m in range(minor, -1, -1):
            path = folder / f"{stem}.sm_{major}{m}.cubin"
            if path.is_file():
                return path
    return None


def find_kernel_source(stem: str) -> Path | None:
    for folder in kernel_source_dirs():
        path = folder / f"{stem}.cu"
        if path.is_file():
            return path
    return None


def cubins_found() -> list[Path]:
    return sorted({p for folder in cubin_dirs() if folder.is_dir() for p in folder.glob("*.cubin")})


class KernelUnavailable(RuntimeError):
    """Neither a prebuilt cubin nor an NVRTC build of the kernel could be loaded on this device."""


# (stem, device) -> why the module could not be loaded, so a failed NVRTC build is not retried per call
_load_failures: dict[tuple[str, int], KernelUnavailable] = {}


def load_module(stem: str, device_index: int):
    """``cupy.RawModule`` for ``kernels/<stem>.cu`` on one device: the prebuilt cubin if one fits and
    loads, else an NVRTC build of the source. Raises ``KernelUnavailable`` when neither works (for
    example no cubin for this GPU and no NVRTC library beside cupy)."""
    failure = _load_failures.get((stem, device_index))
    if failure is not None:
        raise failure
    try:
        return _load_module(stem, device_index)
    except KernelUnavailable as err:
        _load_failures[(stem, device_index)] = err
        raise


@functools.lru_cache(maxsize=None)
def _load_module(stem: str, device_index: int):
    cupy = import_cupy()
    capability = torch.cuda.get_device_capability(device_index)
    cubin = find_cubin(stem, capability)
    with cupy.cuda.Device(device_index):
        if cubin is not None:
            try:
                with cuda_errors_explained(f"loading {cubin.name}"):
                    module = cupy.RawModule(path=str(cubin))
                    for name in _expected_functions(stem):
                        module.get_function(name)
                return module
            except RuntimeError:
                pass  # a cubin from a toolkit newer than the driver, or built from older sources: compile
        source = find_kernel_source(stem)
        if source is None:
            raise KernelUnavailable(f"no cubin for sm_{capability[0]}{capability[1]} and no source {stem}.cu found "
                               f"(looked in {[str(d) for d in cubin_dirs() + kernel_source_dirs()]}); set "
                               "SAGE_FAST_CUBIN_DIR or SAGE_FAST_KERNEL_DIR")
        try:
            with cuda_errors_explained(f"compiling {source.name} with NVRTC"):
                module = cupy.RawModule(code=source.read_text(), options=("-std=c++17", f"-I{source.parent}"))
                for name in _expected_functions(stem):
                    module.get_function(name)
        except Exception as err:  # a missing libnvrtc is a RuntimeError, a compile error cupy's CompileException
            where = f"the cubin {cubin} did not load and " if cubin is not None else ""
            raise KernelUnavailable(f"{where}compiling {source} with NVRTC failed: {type(err).__name__}: {err}") from err
        return module


def _expected_functions(stem: str) -> list[str]:
    """Every kernel the Python side may launch from ``stem``: a cubin that lacks one (built from older
    sources) is not used."""
    if stem == "knn_topk":
        return ([f"knn_topk_k{k}_d{d}" for k in LIST_SIZES for d in PADDED_DIMS]
                + [f"knn_merge_k{k}" for k in LIST_SIZES])
    return [stem]


# ---------------------------------------------------------------- fused kNN

LIST_SIZES = (8, 16, 32)
# Widths the kernel is built for (kernels/knn_topk.cu): a row is zero-padded to the next one, so a 2-D
# map pays for 2 lanes, not 32.
PADDED_DIMS = (2, 4, 8, 16, 32, 64, 128)
THREADS = 128  # must match kernels/knn_topk.cu
MIN_COLS_PER_SPLIT = 256


def kernel_variant(dim: int, k: int) -> tuple[int, int]:
    """``(list_size, padded_dim)``: the built kernel ``knn_topk_k{list_size}_d{padded_dim}`` for ``d``
    and ``k``: the smallest list and width that hold them."""
    if not (1 <= k <= LIST_SIZES[-1] and 1 <= dim <= PADDED_DIMS[-1]):
        raise ValueError(f"the fused kNN kernel handles 1 <= k <= {LIST_SIZES[-1]} and 1 <= d <= {PADDED_DIMS[-1]}, "
                         f"got k={k}, d={dim}")
    return next(s for s in LIST_SIZES if s >= k), next(s for s in PADDED_DIMS if s >= dim)


def fused_knn_available() -> tuple[bool, str]:
    """Whether the fused kNN kernel can run here, and if not, why (no launch, no compile)."""
    if not cupy_installed():
        return False, f"cupy not installed ({GPU_EXTRA_HINT})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not cubins_found() and find_kernel_source("knn_topk") is None:
        return False, "neither a knn_topk cubin nor its source was found"
    return True, "cupy and the knn_topk kernel are available"


def fused_knn_loadable(device_index: int | None = None) -> tuple[bool, str]:
    """Like ``fused_knn_available``, and also loads the kernel module on the device (a cubin, or an
    NVRTC build: seconds the first time, cached after), so that a missing NVRTC library or a cubin the
    driver refuses is reported here rather than at the first launch. For tests and ``sage-fast info``."""
    ok, why = fused_knn_available()
    if not ok:
        return ok, why
    index = torch.cuda.current_device() if device_index is None else device_index
    try:
        load_module("knn_topk", index)
    except (KernelUnavailable, ImportError) as err:
        return False, f"the knn_topk kernel does not load on cuda:{index}: {err}"
    return True, f"the knn_topk kernel loads on cuda:{index}"


def fused_knn(xf: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances ``[N, k]`` and indices ``[N, k]`` of each row's k nearest other rows, from the
    fused kernel. ``xf`` is a contiguous fp32 CUDA tensor with ``d <= 128`` and ``k <= 32``."""
    n, dim = xf.shape
    if k > LIST_SIZES[-1] or dim > PADDED_DIMS[-1] or n >= 2**31 - 1:
        raise ValueError(f"the fused kNN kernel handles k <= {LIST_SIZES[-1]}, d <= {PADDED_DIMS[-1]} and "
                         f"N < 2^31, got k={k}, d={dim}, N={n}")
    if xf.dtype != torch.float32 or not xf.is_contiguous() or xf.device.type != "cuda":
        raise ValueError("xf must be a contiguous float32 CUDA tensor")
    cupy = import_cupy()
    list_size, padded_dim = kernel_variant(dim, k)
    device = xf.device.index if xf.device.index is not None else torch.cuda.current_device()
    module = load_module("knn_topk", device)

    # Split the database across blocks when there are too few query blocks to fill the GPU.
    query_blocks = math.ceil(n / THREADS)
    target_blocks = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(math.ceil(target_blocks / query_blocks), math.ceil(n / MIN_COLS_PER_SPLIT)))
    cols_per_split = math.ceil(n / splits)
    splits = math.ceil(n / cols_per_split)

    part_dist = torch.empty(splits, n, list_size, dtype=torch.float32, device=xf.device)
    part_idx = torch.empty(splits, n, list_size, dtype=torch.int64, device=xf.device)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device)
    int32 = cupy.int32
    with cupy.cuda.Device(device), stream, cuda_errors_explained("the fused kNN kernel"):
        topk = module.get_function(f"knn_topk_k{list_size}_d{padded_dim}")
        topk((query_blocks, splits), (THREADS,),
             (as_cupy(xf), int32(n), int32(dim), int32(cols_per_split), as_cupy(part_dist), as_cupy(part_idx)))
        if splits == 1:
            dist, idx = part_dist[0], part_idx[0]
        else:
            dist = torch.empty(n, list_size, dtype=torch.float32, device=xf.device)
            idx = torch.empty(n, list_size, dtype=torch.int64, device=xf.device)
            merge = module.get_function(f"knn_merge_k{list_size}")
            merge((math.ceil(n / THREADS),), (THREADS,),
                  (as_cupy(part_dist), as_cupy(part_idx), int32(n), int32(splits), as_cupy(dist), as_cupy(idx)))
    return dist[:, :k].contiguous(), idx[:, :k].contiguous()


# ---------------------------------------------------------------- report


def describe() -> list[str]:
    """A few lines for ``sage-fast info``: what the GPU analysis can use here."""
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "?"

    lines = []
    cupy_line = "not installed (" + GPU_EXTRA_HINT + ")"
    if cupy_installed():
        cupy_line = "importable"
        for dist in ("cupy-cuda12x", "cupy-cuda13x", "cupy"):
            if version(dist) != "?":
                cupy_line += f" ({dist} {version(dist)})"
                break
    lines.append(f"cupy: {cupy_line}")
    cuml = "importable" if importlib.util.find_spec("cuml") is not None else f"not installed ({GPU_EXTRA_HINT})"
    lines.append(f"cuML: {cuml}")
    cubins = cubins_found()
    lines.append("cubins: " + (", ".join(p.name for p in cubins) if cubins else "none found (NVRTC at first use)"))
    source = find_kernel_source("knn_topk")
    lines.append(f"kernel sources: {source.parent if source else 'not found'}")
    return lines
