"""Compile a ``@triton.jit`` kernel for Hopper (CUDA sm_90, warp size 32) without a GPU, and read the result.

Static checks that CI can run: the test asserts on the compiled code (vector width of global loads and
stores, registers, spills, instruction count), so a change that silently de-vectorises a kernel or
makes it spill fails without a device.

Usage, from any test under ``tests/ops/`` (pytest puts that folder on ``sys.path``; ``tests/`` has no
``__init__.py``)::

    from sm90 import compile_sm90

    k = compile_sm90(my_kernel,                       # the @triton.jit object (or Autotuner/Heuristics)
                     {"x_ptr": "*bf16",               # a type string: pointers are 16-byte aligned,
                      "n_cols": 32000,                # an int: specialised as the launcher does (i32/i64,
                      "stride": 1,                    #   divisible by 16 when it is; 1 becomes constexpr 1)
                      "scale": 0.5},                  # a float: fp32
                     constexprs={"BLOCK": 1024},      # every tl.constexpr without a default
                     num_warps=8, num_stages=3)
    assert k.ld_global_bits == 128 and k.st_global_bits == 128
    assert k.n_spills == 0, k.summary()

From another test folder, put this one on the path first:
``sys.path.insert(0, str(Path(__file__).parents[1] / "ops"))``.

``compile_sm90(kernel, args, constexprs=None, *, num_warps=4, num_stages=3, unaligned=(),
options=None) -> Sm90Kernel``:

- ``args``: one entry per runtime argument, by name. A string is a Triton type (``"*fp32"``,
  ``"*bf16"``, ``"i32"``, ``"i64"``, ``"fp32"``); a pointer is marked 16-byte aligned (what a torch
  allocation gives) unless its name is in ``unaligned``. An int or float is a sample value,
  specialised like the launcher: 1 becomes the constant 1, a multiple of 16 is marked divisible by 16.
  A tuple of these stands for a tuple argument, specialised element by element.
- ``constexprs``: values of ``tl.constexpr`` arguments; those with a default may be left out. A
  ``tl.dtype`` value (``tl.bfloat16``) is passed by name.
- ``options``: any other ``triton.compile`` option (``{"maxnreg": 128}``).

``Sm90Kernel`` fields: ``name``, ``ptx``, ``sass`` (text; empty if no cuobjdump), ``ld_global`` and
``st_global`` (``{bits: count}`` over the ``ld.global``/``st.global`` instructions in the PTX),
``ld_global_bits`` / ``st_global_bits`` (their widest, 0 if none; 128 = ``v4.b32`` / ``v2.b64``),
``cp_async`` (``{bits: count}`` of ``cp.async`` global-to-shared copies, how pipelined tiles load),
``n_regs`` and ``n_spills`` (registers per thread and local-memory bytes per thread, as the CUDA driver
reports them to Triton: ``n_spills`` counts spill and stack bytes), ``ptx_instructions``,
``sass_instructions`` (SASS without NOPs; 0 if no cuobjdump), ``shared`` (bytes), ``num_warps``,
``count(pattern)`` (PTX instructions whose opcode matches a regex, e.g. ``r"ex2"``) and ``summary()``.

It works while ``TRITON_INTERPRET=1`` is set (tests/conftest.py sets it without a GPU): the interpreter
replaces every ``@triton.jit`` object, including the helpers a kernel calls, so compilation happens in
a helper process started with the interpreter off (one per test session, reused; Triton's disk cache
keeps recompilations cheap). That process sees no GPU (``CUDA_VISIBLE_DEVICES=""``): the target is
explicit, so the result is the same on a machine with or without one. The kernel must be a module-level
name of an importable module or of a file. Where triton, its CUDA backend or ptxas is missing, the
call skips the test with the reason; a kernel that fails to compile fails the test.

Run as a script to print one kernel's summary:
``python tests/ops/sm90.py sage_fast.ops.interpolate:_kernel_name x_ptr='*bf16' n=4096 BLOCK=1024 num_warps=8``
(values are read as JSON where they parse, so a string constexpr is written ``MODE='"tf32"'``; a
constexpr may be given among the runtime arguments, here and in ``args``).
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field

import pytest

# Seconds one compilation may take before the helper process is declared stuck.
COMPILE_TIMEOUT_S = 600

__all__ = ["compile_sm90", "Sm90Kernel", "parse_global_access_bits", "parse_cp_async_bits", "count_ptx_instructions",
           "count_sass_instructions"]


# --- reading the compiled code (pure functions, unit-tested without a compiler) -------------------

_GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s")
_VECTOR = re.compile(r"^v(\d+)$")
_SCALAR_TYPE = re.compile(r"^[bsuf](\d+)$")


def parse_global_access_bits(ptx: str) -> tuple[Counter, Counter]:
    """``({bits: count} of ld.global, {bits: count} of st.global)``: bits = vector length x element
    width, so ``ld.global.v4.b32`` and ``ld.global.v2.b64`` are 128, ``ld.global.b16`` is 16."""
    loads, stores = Counter(), Counter()
    for line in ptx.splitlines():
        m = _GLOBAL_ACCESS.match(line)
        if not m:
            continue
        vec, width = 1, None
        for part in m.group(2).split(".")[1:]:
            if (v := _VECTOR.match(part)):
                vec = int(v.group(1))
            elif (t := _SCALAR_TYPE.match(part)):
                width = int(t.group(1))
        if width is None:
            continue
        (loads if m.group(1) == "ld" else stores)[vec * width] += 1
    return loads, stores


_CP_ASYNC = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.\w+\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def parse_cp_async_bits(ptx: str) -> Counter:
    """``{bits: count}`` of ``cp.async`` global-to-shared copies (how pipelined GEMM tiles are loaded):
    ``cp.async.cg.shared.global [dst], [src], 16`` is 128 bits."""
    sizes = Counter()
    for line in ptx.splitlines():
        m = _CP_ASYNC.match(line)
        if m:
            sizes[8 * int(m.group(1), 0)] += 1
    return sizes


def _ptx_opcodes(ptx: str):
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".", "{", "}", "$")) or s.endswith(":") or not s.endswith(";"):
            continue
        s = re.sub(r"^@!?%\w+\s+", "", s)  # predicate guard
        yield s.split(None, 1)[0].rstrip(";")


def count_ptx_instructions(ptx: str, pattern: str | None = None) -> int:
    """PTX instructions (not directives, labels or comments); with ``pattern``, those whose opcode
    (``ld.global.v4.b32``, ``ex2.approx.f32``...) matches the regex."""
    rx = re.compile(pattern) if pattern else None
    return sum(1 for op in _ptx_opcodes(ptx) if rx is None or rx.search(op))


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?);")


def count_sass_instructions(sass: str) -> int:
    """SASS instructions from ``cuobjdump -sass``, NOPs excluded (they pad the end of the code)."""
    n = 0
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if m and not re.match(r"^(?:@!?U?P\w+\s+)?NOP\b", m.group(1).strip()):
            n += 1
    return n


@dataclass(frozen=True)
class Sm90Kernel:
    name: str
    ptx: str = field(repr=False)
    sass: str = field(repr=False)
    ld_global: dict
    st_global: dict
    cp_async: dict
    n_regs: int
    n_spills: int
    shared: int
    num_warps: int
    ptx_instructions: int
    sass_instructions: int

    @property
    def ld_global_bits(self) -> int:
        return max(self.ld_global, default=0)

    @property
    def st_global_bits(self) -> int:
        return max(self.st_global, default=0)

    def count(self, pattern: str) -> int:
        return count_ptx_instructions(self.ptx, pattern)

    def summary(self) -> str:
        return (f"{self.name}: ld.global bits {dict(sorted(self.ld_global.items()))}, st.global bits "
                f"{dict(sorted(self.st_global.items()))}, {self.n_regs} registers, {self.n_spills} spill bytes, "
                f"{self.ptx_instructions} PTX / {self.sass_instructions} SASS instructions, {self.shared} B shared, "
                f"{self.num_warps} warps")


# --- the helper process --------------------------------------------------------------------------

# Runs with TRITON_INTERPRET unset, so that importing the kernel's module gives real JITFunctions.
# Requests and answers are JSON lines on stdin / the original stdout; anything the kernel's module
# prints goes to stderr instead, so it cannot corrupt an answer.
_WORKER = r'''
import importlib, importlib.util, json, os, re, shutil, subprocess, sys, tempfile, traceback
channel = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

def find_tool(name):
    import triton
    try:
        tool = getattr(triton.knobs.nvidia, name)
        if tool is not None and tool.path and os.path.exists(tool.path):
            return tool.path
    except Exception:
        pass
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)

def load(module, path, name):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        if not path:
            raise
        spec = importlib.util.spec_from_file_location("_sm90_kernel_module_" + str(abs(hash(path))), path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    from triton.runtime.jit import JITFunction
    def unwrap(obj):
        for _ in range(8):
            if isinstance(obj, JITFunction):
                return obj
            obj = getattr(obj, "fn", None)
        return None
    found = unwrap(getattr(mod, name, None))
    if found is None or found.fn.__name__ != name:
        candidates = [unwrap(v) for v in vars(mod).values()]
        found = next((c for c in candidates if c is not None and c.fn.__name__ == name), None)
    if found is None:
        raise LookupError(f"no @triton.jit function named {name!r} at module level in {module}")
    return found

def arg_type(value):
    # the launcher's specialisation (triton.runtime.jit): 1 is a constant, multiples of 16 are marked
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", None
        ty = "i32" if -2**31 <= value < 2**31 else ("i64" if -2**63 <= value < 2**63 else "u64")
        return ty, (16 if value % 16 == 0 else None)
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"unsupported sample value {value!r}")

def compile_one(req):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ptxas = find_tool("ptxas")
    if not ptxas:
        return {"skip": "Triton's ptxas is missing (no CUDA backend binaries in this triton install)"}
    fn = load(req["module"], req["path"], req["name"])
    args, consts, unaligned = req["args"], dict(req["constexprs"]), set(req["unaligned"])
    for k, v in list(consts.items()):
        if isinstance(v, dict) and "tl_dtype" in v:
            consts[k] = tl.core.dtype(v["tl_dtype"])
    unknown = (set(args) | set(consts)) - set(fn.arg_names)
    if unknown:
        raise TypeError(f"{fn.__name__} has no argument(s) {sorted(unknown)}; its arguments: {fn.arg_names}")
    signature, constants, attrs, missing = {}, {}, {}, []
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            if name in consts:
                constants[(i,)] = consts[name]
            elif name in args:  # a constexpr given among the runtime arguments (the command line does)
                value = args[name]
                constants[(i,)] = tl.core.dtype(value["tl_dtype"]) if isinstance(value, dict) else value
            elif param.has_default:
                constants[(i,)] = param.default
            else:
                missing.append(name)
            continue
        if name not in args:
            missing.append(name)
            continue
        value = args[name]
        # a tuple argument (a list here) is specialised element by element, as the launcher does
        entries = [((i, j), v) for j, v in enumerate(value)] if isinstance(value, list) else [((i,), value)]
        types = []
        for path, v in entries:
            if isinstance(v, str):
                types.append(v)
                if v.startswith("*") and name not in unaligned:
                    attrs[path] = [["tt.divisibility", 16]]
            else:
                ty, div = arg_type(v)
                types.append(ty)
                if ty == "constexpr":
                    constants[path] = v
                elif div and name not in unaligned:
                    attrs[path] = [["tt.divisibility", div]]
        signature[name] = tuple(types) if isinstance(value, list) else types[0]
    if missing:
        raise TypeError(f"{fn.__name__}: give a value for {missing} (args for runtime arguments, constexprs "
                        "for tl.constexpr ones)")
    src = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    options = dict(req["options"])
    options.update(num_warps=req["num_warps"], num_stages=req["num_stages"])
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    out = {"name": kernel.metadata.name, "ptx": ptx, "shared": int(kernel.metadata.shared), "sass": ""}
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        cuobjdump = find_tool("cuobjdump")
        if cuobjdump:
            # REG and LOCAL are what the driver reports to Triton as n_regs and n_spills
            res = subprocess.run([cuobjdump, "-res-usage", cubin_path], capture_output=True, text=True,
                                 check=True).stdout
            m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res)
            out["n_regs"], out["n_spills"] = int(m.group(1)), int(m.group(2))
            out["sass"] = subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True, text=True,
                                         check=True).stdout
        else:
            ptx_path = os.path.join(tmp, "k.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx_path, "-o", cubin_path + ".2"],
                                 capture_output=True, text=True, check=True).stderr
            out["n_regs"] = int(re.search(r"Used (\d+) registers", log).group(1))
            out["n_spills"] = sum(int(v) for v in re.findall(r"(\d+) bytes (?:stack frame|spill stores)", log))
    return out

for line in sys.stdin:
    try:
        answer = compile_one(json.loads(line))
    except BaseException as err:
        answer = {"error": "".join(traceback.format_exception(type(err), err, err.__traceback__))}
    channel.write(json.dumps(answer) + "\n")
    channel.flush()
'''


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["CUDA_VISIBLE_DEVICES"] = ""  # compile only: never take a device context or memory
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launcher's default, without its warning
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [os.getcwd()])
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], COMPILE_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            self.log.seek(0)
            raise RuntimeError("the sm_90 compile process " + ("timed out" if not ready else "died")
                               + ":\n" + self.log.read()[-4000:])
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


_lock = threading.Lock()
_worker: _Worker | None = None
_cache: dict = {}


def _close_worker():
    if _worker is not None:
        _worker.close()


atexit.register(_close_worker)


def _encode_constexpr(name, value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    dtype_name = getattr(value, "name", None)
    if type(value).__name__ in ("dtype", "pointer_type") and isinstance(dtype_name, str):
        return {"tl_dtype": dtype_name}
    raise TypeError(f"constexprs[{name!r}]: only int, float, bool, str, None or a tl.dtype can be passed, "
                    f"got {type(value).__name__}")


def _kernel_location(kernel):
    fn = kernel
    for _ in range(8):  # Autotuner / Heuristics -> JITFunction or InterpretedFunction -> function
        if not hasattr(fn, "fn"):
            break
        fn = fn.fn
    if not callable(fn) or not hasattr(fn, "__code__"):
        raise TypeError(f"kernel must be a @triton.jit function, got {type(kernel).__name__}")
    if "<locals>" in fn.__qualname__:
        raise ValueError(f"kernel {fn.__qualname__} is defined inside a function: define it at module level")
    return fn.__module__, fn.__code__.co_filename, fn.__name__


def compile_sm90(kernel, args: dict, constexprs: dict | None = None, *, num_warps: int = 4, num_stages: int = 3,
                 unaligned=(), options: dict | None = None) -> Sm90Kernel:
    """Compile ``kernel`` for CUDA sm_90 (no GPU needed) and return what the compiled code shows.
    See the module docstring for the arguments."""
    global _worker
    try:
        importlib.import_module("triton")
    except ImportError as err:
        pytest.skip(f"triton is not installed: {err}")
    module, path, name = _kernel_location(kernel)
    for arg_name, value in args.items():
        entries = value if isinstance(value, (tuple, list)) else (value,)
        if not entries or not all(isinstance(v, (str, int, float)) for v in entries):
            raise TypeError(f"args[{arg_name!r}] must be a Triton type string or a sample int/float (or a "
                            f"tuple of them, for a tuple argument), got {value!r}")
    request = {
        "module": module, "path": path, "name": name, "args": dict(args),
        "constexprs": {k: _encode_constexpr(k, v) for k, v in (constexprs or {}).items()},
        "unaligned": sorted(unaligned), "options": dict(options or {}),
        "num_warps": int(num_warps), "num_stages": int(num_stages),
    }
    key = json.dumps(request, sort_keys=True)
    with _lock:
        if key not in _cache:
            if _worker is None or not _worker.alive():
                _worker = _Worker()
            _cache[key] = _worker.ask(request)
        answer = _cache[key]
    if "skip" in answer:
        pytest.skip(answer["skip"])
    if "error" in answer:
        raise RuntimeError(f"compiling {module}.{name} for sm_90 failed:\n{answer['error']}")
    loads, stores = parse_global_access_bits(answer["ptx"])
    return Sm90Kernel(
        name=answer["name"], ptx=answer["ptx"], sass=answer["sass"], ld_global=dict(loads), st_global=dict(stores),
        cp_async=dict(parse_cp_async_bits(answer["ptx"])),
        n_regs=answer["n_regs"], n_spills=answer["n_spills"], shared=answer["shared"], num_warps=int(num_warps),
        ptx_instructions=count_ptx_instructions(answer["ptx"]), sass_instructions=count_sass_instructions(answer["sass"]))


def _main(argv: list[str]) -> int:
    if len(argv) < 1 or ":" not in argv[0]:
        print(__doc__.split("Run as a script", 1)[1].strip())
        return 2
    module, name = argv[0].split(":", 1)
    kernel = getattr(importlib.import_module(module), name)
    args, warps, stages = {}, 4, 3
    for item in argv[1:]:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key == "num_warps":
            warps = int(value)
        elif key == "num_stages":
            stages = int(value)
        else:
            args[key] = value  # the helper process tells constexprs from runtime arguments
    print(compile_sm90(kernel, args, num_warps=warps, num_stages=stages).summary())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
