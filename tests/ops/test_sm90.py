"""The sm_90 compile utility itself: it must see 128-bit accesses where they are, and narrower ones where
alignment is not known, so that the kernel checks built on it can fail."""
import pytest
import triton
import triton.language as tl

from sm90 import (compile_sm90, count_ptx_instructions, count_sass_instructions, parse_cp_async_bits,
                  parse_global_access_bits)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _scaled_copy_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    # calls a jit helper, which the interpreter also replaces
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, _times(x, scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _times(x, scale):
    return x * scale


def test_parse_global_access_bits():
    ptx = "\n".join([
        "\t.param .u64 .ptr .global .align 1 k_param_0,",
        "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\tld.global.L1::evict_last.v2.b64 { %rd5, %rd6 }, [ %rd2 + 0 ];",
        "\t@!%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];",
        "\tld.global.nc.f32 %f1, [%rd4];",
        "\t@%p1 st.global.v2.b32 [ %rd3 + 0 ], { %r1, %r2 };",
        "\tst.shared.v4.b32 [ %r9 + 0 ], { %r1, %r2, %r3, %r4 };",
    ])
    loads, stores = parse_global_access_bits(ptx)
    assert loads == {128: 2, 16: 1, 32: 1}
    assert stores == {64: 1}
    assert count_ptx_instructions(ptx) == 6
    assert count_ptx_instructions(ptx, r"^ld\.global") == 4
    cp = "\tcp.async.cg.shared.global [ %r25 + 0 ], [ %rd13 + 0 ], 0x10, %r26;\n\tcp.async.ca.shared.global [%r1], [%rd2], 4;"
    assert parse_cp_async_bits(cp) == {128: 1, 32: 1}


def test_count_sass_instructions():
    sass = "\n".join([
        "        /*0000*/                   LDC R1, c[0x0][0x28] ;        /* 0x00000a00ff017b82 */",
        "                                                                 /* 0x000fe20000000800 */",
        "        /*0010*/              @P0  EXIT ;                         /* 0x000000000000094d */",
        "        /*0020*/                   NOP;                           /* 0x0000000000007918 */",
    ])
    assert count_sass_instructions(sass) == 2


def test_copy_kernel_fp32_is_128_bit():
    k = compile_sm90(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": 1 << 20}, {"BLOCK": 1024})
    assert k.ld_global_bits == 128 and k.st_global_bits == 128, k.summary()
    assert set(k.ld_global) == {128} and set(k.st_global) == {128}, k.summary()
    assert k.n_spills == 0 and 0 < k.n_regs <= 64, k.summary()
    assert k.ptx_instructions > 0 and k.count(r"^ld\.global") == sum(k.ld_global.values())
    if k.sass:
        assert "LDG.E.128" in k.sass and k.sass_instructions > 0


def test_bf16_with_helper_and_float_argument():
    k = compile_sm90(_scaled_copy_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": 4096 * 768, "scale": 0.5},
                     {"BLOCK": 2048}, num_warps=8)
    assert k.ld_global_bits == 128 and k.st_global_bits == 128, k.summary()
    assert k.n_spills == 0, k.summary()


def test_unknown_alignment_is_seen_narrower():
    # the same copy with a pointer of unknown alignment cannot use 128-bit accesses: the utility must
    # report it, or the checks built on it could never fail
    k = compile_sm90(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": 1 << 20}, {"BLOCK": 1024},
                     unaligned=("x_ptr",))
    assert k.ld_global_bits < 128, k.summary()
    assert k.st_global_bits == 128, k.summary()


def test_bad_arguments_fail_clearly():
    with pytest.raises(RuntimeError, match="give a value for"):
        compile_sm90(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, {"BLOCK": 1024})
    with pytest.raises(RuntimeError, match="no argument"):
        compile_sm90(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": 16, "m": 3}, {"BLOCK": 1024})
    with pytest.raises(TypeError, match="args"):
        compile_sm90(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": None}, {"BLOCK": 1024})
    with pytest.raises(TypeError, match="args"):
        compile_sm90(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": ()}, {"BLOCK": 1024})


def test_constexpr_given_among_args():
    # as the command line passes them: the helper process tells constexprs from runtime arguments
    k = compile_sm90(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": 1 << 20, "BLOCK": 1024})
    assert k.ld_global_bits == 128, k.summary()
