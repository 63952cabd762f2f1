"""Static checks of the CUDA kernels under kernels/, without a GPU: each source compiles with nvcc for
sm_90, no kernel spills registers (``-Xptxas -v``), the per-thread kNN kernels keep their query and
neighbour list in registers (no stack frame), and every kernel the Python side can ask for is built."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sage_fast.regions import _gpu

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
ARCH = "sm_90"

nvcc = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(nvcc is None, reason="nvcc (the CUDA compiler) is not installed")


def parse_ptxas_verbose(log: str) -> dict[str, dict[str, int]]:
    """``{kernel: {"registers", "stack", "spill_stores", "spill_loads"}}`` from ``nvcc -Xptxas -v``."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if (m := re.search(r"Compiling entry function '(\w+)'", line)):
            current = kernels.setdefault(m.group(1), {})
        elif (m := re.search(r"Function properties for (\w+)", line)):
            current = kernels.setdefault(m.group(1), {})
        elif current is not None and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
    return kernels


def test_parse_ptxas_verbose():
    log = """ptxas info    : Compiling entry function 'knn_topk_k32_d4' for 'sm_90'
ptxas info    : Function properties for knn_topk_k32_d4
    8 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compiling entry function 'knn_merge_k8' for 'sm_90'
ptxas info    : Function properties for knn_merge_k8
    96 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 41 registers, used 0 barriers, 96 bytes cumulative stack size
"""
    parsed = parse_ptxas_verbose(log)
    assert parsed["knn_topk_k32_d4"] == {"stack": 8, "spill_stores": 8, "spill_loads": 16, "registers": 96}
    assert parsed["knn_merge_k8"] == {"stack": 96, "spill_stores": 0, "spill_loads": 0, "registers": 41}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source stem: {kernel: resources}}: every kernels/*.cu compiled once, as CMakeLists.txt does."""
    out = tmp_path_factory.mktemp("cubins")
    result = {}
    for src in SOURCES:
        proc = subprocess.run([nvcc, "-cubin", "-O3", "-std=c++17", f"-arch={ARCH}", "-Xptxas", "-v",
                               "-I", str(KERNELS), "-o", str(out / f"{src.stem}.{ARCH}.cubin"), str(src)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"nvcc failed on {src.name}:\n{proc.stderr[-4000:]}"
        result[src.stem] = parse_ptxas_verbose(proc.stderr)
        assert result[src.stem], f"no kernels found in the ptxas report of {src.name}:\n{proc.stderr[-2000:]}"
    return result


def test_there_are_sources():
    assert SOURCES, f"no .cu files under {KERNELS}"


def test_no_kernel_spills(compiled):
    spilling = {f"{stem}:{name}": r for stem, kernels in compiled.items() for name, r in kernels.items()
                if r.get("spill_stores", 0) or r.get("spill_loads", 0)}
    assert not spilling, f"register spills on {ARCH}: {spilling}"


def test_knn_topk_keeps_query_and_list_in_registers(compiled):
    # A stack frame here means a runtime-indexed array (the query or the list) went to local memory.
    # The merge kernels do have one (they walk two lists with runtime indices); they run once per row.
    topk = {name: r for name, r in compiled["knn_topk"].items() if name.startswith("knn_topk_")}
    on_stack = {name: r for name, r in topk.items() if r.get("stack", 0)}
    assert not on_stack, f"kNN kernels with a stack frame on {ARCH}: {on_stack}"
    assert all(r["registers"] <= 255 for r in topk.values())


def test_every_variant_python_can_launch_is_built(compiled):
    built = set(compiled["knn_topk"])
    wanted = {f"knn_topk_k{k}_d{d}" for k in _gpu.LIST_SIZES for d in _gpu.PADDED_DIMS}
    wanted |= {f"knn_merge_k{k}" for k in _gpu.LIST_SIZES}
    assert wanted <= built, f"kernels the Python side launches but the source does not build: {sorted(wanted - built)}"
    # and a 2-D map gets a narrow kernel, not one padded to 32
    assert _gpu.kernel_variant(2, 15) == (16, 2)
    assert _gpu.kernel_variant(3, 8) == (8, 4)
    assert _gpu.kernel_variant(64, 16) == (16, 64)
