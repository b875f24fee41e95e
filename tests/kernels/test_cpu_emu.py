"""The emulated instructions of the emu build (kernels/cpu/sparse_cpu.c, SPARSE_CPU_EMU) against
a Python model of the operation the Intel SDM gives for them, bit for bit: VDPBF16PS (odd pair
first, then even), VCVTNEPS2BF16, VPUNPCKLWD / VPUNPCKHWD (within 128-bit lanes), VBROADCASTSS,
TDPBF16PS (an even and an odd fp32 sum per output over k, added, then added to C), each
multiply-add one rounding to nearest even with denormal inputs as zero (DAZ) and denormal
results as zero (FTZ); and the faults (#GP / #UD / no arch_prctl
grant) that end the process. The model works in exact rationals (fractions), so it does not
share the C code's rounding. Each comparison also checks that the inputs tell the documented
order, DAZ and FTZ apart from the alternatives, so a wrong emulation cannot pass."""
import ctypes
import math
import platform
import shutil
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from kernels import cpu

pytestmark = pytest.mark.skipif(
    not (platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu._cpu_flags()
         and (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc"))),
    reason="the emu build needs an x86-64 CPU with avx2 + fma and a C compiler")

F32_MIN_NORMAL = Fraction(1, 2 ** 126)


@pytest.fixture(scope="module")
def emu():
    path = cpu.build("emu")
    so = ctypes.CDLL(str(path))
    i64, p, i = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.emu_vdpbf16ps.argtypes = [i64, p, p, p]
    so.emu_vcvtneps2bf16.argtypes = [i64, p, p]
    so.emu_vpunpckwd.argtypes = [i64, i, p, p, p]
    so.emu_vbroadcastss.argtypes = [i64, p, p]
    so.emu_ldtilecfg.argtypes = [p]
    so.emu_tilezero.argtypes = [i]
    so.emu_tileloadd.argtypes = [i, p, i64]
    so.emu_tilestored.argtypes = [i, p, i64]
    so.emu_tdpbf16ps.argtypes = [i, i, i]
    assert so.sparse_cpu_amx_init() == 0
    so.path = path
    return so


# -- the model -------------------------------------------------------------------------------

def bf16_value(bits: int, daz: bool = True) -> Fraction:
    """The bf16 of these 16 bits (finite), a denormal as 0 under DAZ."""
    sign = -1 if bits & 0x8000 else 1
    e, m = (bits >> 7) & 0xFF, bits & 0x7F
    assert e != 0xFF, "finite inputs only"
    if e == 0:
        return Fraction(0) if daz else sign * Fraction(m, 2 ** 133)
    return sign * Fraction(128 + m, 2 ** 7) * Fraction(2) ** (e - 127)


def f32_value(x, daz: bool = True) -> Fraction:
    """An fp32 value (float or Fraction, finite), a denormal as 0 under DAZ."""
    v = Fraction(x)
    return Fraction(0) if daz and abs(v) < F32_MIN_NORMAL else v


def round_f32(v: Fraction, ftz: bool = True) -> Fraction:
    """v to fp32, to nearest even (ties to even, overflow to inf); under FTZ a result below the
    smallest normal after rounding is 0. (A Fraction; a float infinity on overflow.)"""
    if v == 0:
        return Fraction(0)
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    r = round(a / quantum) * quantum  # Fraction rounds half to even
    if r >= 2 ** 128:
        return math.copysign(math.inf, v)
    if ftz and r < F32_MIN_NORMAL:
        return Fraction(0)
    return r if v > 0 else -r


def fma(a: Fraction, b: Fraction, c: Fraction, ftz: bool = True) -> Fraction:
    """a * b + c in one rounding (finite results only: the tests keep far from overflow)."""
    return round_f32(a * b + c, ftz)


def model_vdpbf16ps(acc, a, b, order="odd first", daz=True, ftz=True):
    """One VDPBF16PS on 16 lanes: acc [16] fp32 values, a / b [32] bf16 bits."""
    out = []
    for i in range(16):
        s = acc[i]
        for j in (2 * i + 1, 2 * i) if order == "odd first" else (2 * i, 2 * i + 1):
            s = fma(bf16_value(a[j], daz), bf16_value(b[j], daz), f32_value(s, daz), ftz)
        out.append(s)
    return out


def model_tdpbf16ps(c, a, b, sums="even and odd"):
    """TDPBF16PS: c [M][N] fp32 values, a [M][2K] and b [K][2N] bf16 bits -> [M][N]. ``sums``:
    the SDM's two sums per output ('even and odd'), or one running sum into C ('one', the
    intrinsics guide's shorter pseudo-code) for the discrimination check."""
    M, N, K = len(c), len(c[0]), len(b)
    out = []
    for m in range(M):
        row = []
        for n in range(N):
            if sums == "even and odd":
                even = odd = Fraction(0)
                for k in range(K):
                    even = fma(bf16_value(a[m][2 * k]), bf16_value(b[k][2 * n]), even)
                    odd = fma(bf16_value(a[m][2 * k + 1]), bf16_value(b[k][2 * n + 1]), odd)
                row.append(round_f32(f32_value(c[m][n]) + round_f32(even + odd)))
            else:
                s = f32_value(c[m][n])
                for k in range(K):
                    s = fma(bf16_value(a[m][2 * k]), bf16_value(b[k][2 * n]), s)
                    s = fma(bf16_value(a[m][2 * k + 1]), bf16_value(b[k][2 * n + 1]), s)
                row.append(s)
        out.append(row)
    return out


def random_bf16_bits(g, n, exp_lo, exp_hi, denormal_share=0.1):
    """n finite bf16 bit patterns: random signs and mantissas, biased exponents in [exp_lo,
    exp_hi], a share of them denormal (exponent 0, mantissa != 0)."""
    sign = torch.randint(0, 2, (n,), generator=g) << 15
    exp = torch.randint(exp_lo, exp_hi + 1, (n,), generator=g)
    exp = torch.where(torch.rand(n, generator=g) < denormal_share, torch.zeros_like(exp), exp)
    mant = torch.randint(0, 128, (n,), generator=g)
    mant = torch.where((exp == 0) & (mant == 0), torch.ones_like(mant), mant)
    return (sign | (exp << 7) | mant).to(torch.int32).to(torch.int16)  # (the bits of a bf16 tensor)


def as_fp32_values(t: torch.Tensor) -> list:
    return [Fraction(v) if math.isfinite(v) else v for v in t.double().tolist()]


def agree(got: list, want: list) -> bool:
    return all(g == w for g, w in zip(got, want))


# -- VDPBF16PS, VCVTNEPS2BF16 ----------------------------------------------------------------

def test_emulated_vdpbf16ps_is_the_documented_operation(emu):
    g = torch.Generator().manual_seed(50)
    lanes = 16 * 128
    # products around 2^0 and accumulators spread around them: cancellation, ties and
    # rounding order matter; a share of denormal inputs (DAZ) and of tiny ones whose results
    # land below 2^-126 (FTZ)
    a = random_bf16_bits(g, 2 * lanes, 120, 134)
    b = random_bf16_bits(g, 2 * lanes, 120, 134)
    acc = torch.randn(lanes, generator=g) * 4 ** torch.randint(-3, 4, (lanes,), generator=g)
    acc[::17] = torch.tensor(2.0 ** -130)  # a denormal accumulator: read as 0
    tiny = torch.rand(lanes, generator=g) < 0.15  # lanes whose both products lie near 2^-126
    a = torch.where(tiny.repeat_interleave(2), random_bf16_bits(g, 2 * lanes, 1, 10, 0.0), a)
    acc[tiny] = 0.0
    got = acc.clone()
    emu.emu_vdpbf16ps(lanes, got.data_ptr(), a.data_ptr(), b.data_ptr())
    got = as_fp32_values(got)
    a_bits = [v & 0xFFFF for v in a.tolist()]
    b_bits = [v & 0xFFFF for v in b.tolist()]
    accs = acc.double().tolist()
    models = {}
    for variant in ({}, {"order": "even first"}, {"daz": False}, {"ftz": False}):
        out = []
        for j in range(0, lanes, 16):
            out += model_vdpbf16ps(accs[j:j + 16], a_bits[2 * j:2 * j + 32], b_bits[2 * j:2 * j + 32], **variant)
        models[tuple(variant.items())] = out
    documented = models[()]
    bad = [i for i in range(lanes) if got[i] != documented[i]]
    assert not bad, (f"{len(bad)} of {lanes} lanes differ from the documented VDPBF16PS, first lane {bad[0]}: "
                     f"{float(got[bad[0]])!r} != {float(documented[bad[0]])!r}")
    for variant, out in models.items():  # the data tells the documented semantics from each alternative
        if variant:
            assert not agree(out, documented), f"the inputs do not tell {dict(variant)} from the documented operation"


def test_emulated_vdpbf16ps_keeps_nan_and_infinity(emu):
    one, inf, nan = 0x3F80, 0x7F80, 0x7FC0
    a = torch.tensor([one, one] * 16, dtype=torch.int32).to(torch.int16)
    b = a.clone()
    b[0], b[3], b[5] = nan, inf, inf  # lane 0 even NaN; lane 1 odd inf; lane 2 odd inf
    a[5] = -128  # 0xff80, -inf: -inf * inf in lane 2
    acc = torch.zeros(16)
    acc[4] = float("nan")
    emu.emu_vdpbf16ps(16, acc.data_ptr(), a.data_ptr(), b.data_ptr())
    assert math.isnan(acc[0]) and acc[1] == math.inf and acc[2] == -math.inf and math.isnan(acc[4])
    assert torch.equal(acc[5:], torch.full((11,), 2.0))


def test_emulated_vcvtneps2bf16_rounds_to_nearest_even_and_flushes_denormals(emu):
    g = torch.Generator().manual_seed(51)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(0, 2 ** 15, (64,), generator=g, dtype=torch.int32) << 16) | 0x8000
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 3.3895e38, -3.3895e38, 1e-40, -1e-40, 2.0 ** -126])
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), special])
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    emu.emu_vcvtneps2bf16(x.numel(), x.data_ptr(), out.data_ptr())
    denormal = (x != 0) & (x.abs() < 2.0 ** -126)
    want = torch.where(denormal, torch.copysign(torch.zeros_like(x), x), x).to(torch.bfloat16)
    nan = torch.isnan(x)
    assert denormal.sum() > 0 and torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.all(out[nan].view(torch.int16) & 0x40 != 0), "a NaN comes out quiet"


def model_vpunpckwd(a, b, high, per_lane=True, a_first=True):
    """VPUNPCKLWD (high False) / VPUNPCKHWD zmm on 32 words each: in each 128-bit lane the low
    (high) four words of a and b interleaved, a's first. The alternatives for the discrimination
    check: one interleave over the whole register (per_lane False), b's words first."""
    out = []
    for lane in range(4) if per_lane else range(1):
        base = 8 * lane + 4 * high if per_lane else 16 * high
        for k in range(4 if per_lane else 16):
            first, second = (a, b) if a_first else (b, a)
            out += [first[base + k], second[base + k]]
    return out


@pytest.mark.parametrize("high", [0, 1])
def test_emulated_vpunpcklwd_and_vpunpckhwd_interleave_within_128_bit_lanes(emu, high):
    g = torch.Generator().manual_seed(53 + high)
    n = 32 * 16
    a = torch.randint(-2 ** 15, 2 ** 15, (n,), generator=g, dtype=torch.int32).to(torch.int16)
    b = torch.randint(-2 ** 15, 2 ** 15, (n,), generator=g, dtype=torch.int32).to(torch.int16)
    out = torch.empty(n, dtype=torch.int16)
    emu.emu_vpunpckwd(n, high, a.data_ptr(), b.data_ptr(), out.data_ptr())
    got, a_words, b_words = out.tolist(), a.tolist(), b.tolist()
    for j in range(0, n, 32):
        want = model_vpunpckwd(a_words[j:j + 32], b_words[j:j + 32], high)
        assert got[j:j + 32] == want, f"register {j // 32} differs from the documented VPUNPCK{'HWD' if high else 'LWD'}"
        for variant in ({"per_lane": False}, {"a_first": False}, {"high": 1 - high}):
            args = {"high": high, **variant}
            other = model_vpunpckwd(a_words[j:j + 32], b_words[j:j + 32], args.pop("high"), **args)
            assert other != want, f"the inputs do not tell {variant} from the documented operation"


def test_emulated_vbroadcastss_copies_the_bits(emu):
    """VBROADCASTSS then VMOVUPS: every lane the source's 32 bits, a signalling NaN's payload, a
    negative zero and denormals included (a move, not arithmetic: no quieting, no DAZ)."""
    g = torch.Generator().manual_seed(55)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (60,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0x7F800001, 0x7FA00000, -0x7FFFFFFF, 0x00000001, 0x807FFFFF, -2 ** 31],
                           dtype=torch.int64).to(torch.int32)  # sNaN, sNaN, -sNaN, denormals, -0
    src = torch.cat([bits, special]).view(torch.float32)
    out = torch.empty(16 * src.numel())
    emu.emu_vbroadcastss(out.numel(), src.data_ptr(), out.data_ptr())
    assert torch.equal(out.view(torch.int32).reshape(-1, 16), src.view(torch.int32)[:, None].expand(-1, 16))


# -- the tiles -------------------------------------------------------------------------------

def tile_config(**tiles) -> ctypes.Array:
    """LDTILECFG's 64 bytes, palette 1: tiles={'0': (rows, colsb), ...} as keyword t0=(r, c)."""
    cfg = (ctypes.c_uint8 * 64)()
    cfg[0] = 1
    for name, (rows, colsb) in tiles.items():
        t = int(name[1:])
        cfg[16 + 2 * t], cfg[17 + 2 * t] = colsb & 0xFF, colsb >> 8
        cfg[48 + t] = rows
    return cfg


@pytest.mark.parametrize("M, K, N", [(16, 16, 16), (5, 8, 16), (1, 3, 7), (16, 1, 1)])
def test_emulated_tdpbf16ps_is_the_documented_operation(emu, M, K, N):
    """C [M, N] fp32 += A [M, K pairs] B [K, N pairs] through the emulated tile instructions,
    loaded and stored at strides wider than a row."""
    g = torch.Generator().manual_seed(52 + M + K + N)
    a = random_bf16_bits(g, M * 2 * K, 118, 136).reshape(M, 2 * K)
    b = random_bf16_bits(g, K * 2 * N, 118, 136).reshape(K, 2 * N)
    c = torch.randn(M, N, generator=g) * 8
    a_mem = torch.zeros(M, 2 * K + 6, dtype=torch.int16)
    a_mem[:, :2 * K] = a
    c_mem = torch.full((M, N + 3), -1.0)
    c_mem[:, :N] = c
    out = torch.full((M, N + 5), 7.0)
    emu.emu_ldtilecfg(tile_config(t0=(M, 4 * N), t3=(M, 4 * K), t5=(K, 4 * N)))
    emu.emu_tileloadd(0, c_mem.data_ptr(), c_mem.stride(0) * 4)
    emu.emu_tileloadd(3, a_mem.data_ptr(), a_mem.stride(0) * 2)
    emu.emu_tileloadd(5, b.contiguous().data_ptr(), 4 * N)
    emu.emu_tdpbf16ps(0, 3, 5)
    emu.emu_tilestored(0, out.data_ptr(), out.stride(0) * 4)
    emu.emu_tilerelease()
    assert torch.all(out[:, N:] == 7.0), "TILESTORED wrote past colsb"
    a_bits = [[v & 0xFFFF for v in row] for row in a.tolist()]
    b_bits = [[v & 0xFFFF for v in row] for row in b.tolist()]
    want = model_tdpbf16ps(c.double().tolist(), a_bits, b_bits)
    got = [as_fp32_values(row) for row in out[:, :N]]
    bad = [(m, n) for m in range(M) for n in range(N) if got[m][n] != want[m][n]]
    assert not bad, f"{len(bad)} of {M * N} outputs differ from the documented TDPBF16PS, first {bad[0]}"
    if K > 1:
        one = model_tdpbf16ps(c.double().tolist(), a_bits, b_bits, sums="one")
        assert one != want, "the inputs do not tell one running sum from the documented two"


def test_tilezero_and_a_new_configuration_clear_the_tiles(emu):
    ones = torch.ones(16, 16)
    out = torch.full((16, 16), 5.0)
    emu.emu_ldtilecfg(tile_config(t1=(16, 64), t2=(4, 64)))
    emu.emu_tileloadd(1, ones.data_ptr(), 64)
    emu.emu_tilestored(1, out.data_ptr(), 64)
    assert torch.equal(out, ones)
    emu.emu_tilezero(1)
    emu.emu_tilestored(1, out.data_ptr(), 64)
    assert not out.any()
    emu.emu_tileloadd(1, ones.data_ptr(), 64)
    emu.emu_ldtilecfg(tile_config(t1=(16, 64)))
    emu.emu_tilestored(1, out.data_ptr(), 64)
    assert not out.any()
    emu.emu_tilerelease()


FAULTS = {
    # case: (code run after loading the library, the message it must end the process with)
    "a tile instruction before arch_prctl's grant": (
        "so.emu_ldtilecfg(cfg)", "LDTILECFG: the process has no tile state: arch_prctl"),
    "TILELOADD before LDTILECFG": (
        "so.sparse_cpu_amx_init(); so.emu_tileloadd(0, buf, 64)", "TILELOADD: #UD: no tile configuration"),
    "rows beyond 16": (
        "so.sparse_cpu_amx_init(); cfg[48] = 17; so.emu_ldtilecfg(cfg)", "LDTILECFG: #GP: tmm0 rows 17 > 16"),
    "colsb beyond 64": (
        "so.sparse_cpu_amx_init(); cfg[16] = 68; so.emu_ldtilecfg(cfg)", "LDTILECFG: #GP: tmm0 colsb 68 > 64"),
    "a ninth tile": (
        "so.sparse_cpu_amx_init(); cfg[56] = 1; cfg[32] = 4; so.emu_ldtilecfg(cfg)",
        "LDTILECFG: #GP: tile 8 configured"),
    "rows without colsb": (
        "so.sparse_cpu_amx_init(); cfg[16] = 0; so.emu_ldtilecfg(cfg)", "LDTILECFG: #GP: tmm0 rows 16, colsb 0"),
    "a reserved byte": (
        "so.sparse_cpu_amx_init(); cfg[7] = 1; so.emu_ldtilecfg(cfg)", "LDTILECFG: #GP: reserved byte 7"),
    "an unconfigured tile": (
        "so.sparse_cpu_amx_init(); so.emu_ldtilecfg(cfg); so.emu_tilezero(5)", "TILEZERO: #UD: tmm5 is not configured"),
    "rows past the configuration's": (  # C 16 rows, A 8 rows
        "so.sparse_cpu_amx_init(); cfg[49] = 8; so.emu_ldtilecfg(cfg); so.emu_tdpbf16ps(0, 1, 2)",
        "TDPBF16PS: #UD: C rows 16 != A rows 8"),
    "A's pairs against B's rows": (
        "so.sparse_cpu_amx_init(); cfg[50] = 8; so.emu_ldtilecfg(cfg); so.emu_tdpbf16ps(0, 1, 2)",
        "TDPBF16PS: #UD: A colsb / 4 = 16 != B rows 8"),
    "C's width against B's": (
        "so.sparse_cpu_amx_init(); cfg[16] = 32; so.emu_ldtilecfg(cfg); so.emu_tdpbf16ps(0, 1, 2)",
        "TDPBF16PS: #UD: C colsb 32 != B colsb 64"),
    "one tile twice": (
        "so.sparse_cpu_amx_init(); so.emu_ldtilecfg(cfg); so.emu_tdpbf16ps(0, 0, 2)",
        "TDPBF16PS: #UD: tmm0, tmm0, tmm2 are not three tiles"),
    "tmm8": (
        "so.sparse_cpu_amx_init(); so.emu_ldtilecfg(cfg); so.emu_tilezero(8)", "TILEZERO: #UD: tmm8 does not exist"),
}
FAULT_SCRIPT = """
import ctypes, sys
so = ctypes.CDLL(sys.argv[1])
so.emu_tileloadd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
buf = (ctypes.c_uint8 * 1024)()
cfg = (ctypes.c_uint8 * 64)()
cfg[0] = 1
for t in range(3):  # tmm0-2: 16 rows x 64 bytes (C, A, B of a 16 x 16 x 16 product)
    cfg[16 + 2 * t], cfg[48 + t] = 64, 16
{code}
print("no fault")
"""


def run_fault_script(emu, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAULT_SCRIPT.format(code=code), str(emu.path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", list(FAULTS))
def test_what_the_hardware_faults_on_ends_the_process_with_the_reason(emu, case):
    code, message = FAULTS[case]
    done = run_fault_script(emu, code)
    assert done.returncode != 0 and "no fault" not in done.stdout, f"{case}: ran on ({done.stdout!r})"
    assert f"sparse_cpu emu: {message}" in done.stderr, f"{case}: {done.stderr[-500:]}"


def test_the_fault_script_runs_a_valid_sequence_to_the_end(emu):
    done = run_fault_script(emu, "so.sparse_cpu_amx_init(); so.emu_ldtilecfg(cfg); so.emu_tilezero(0); "
                                 "so.emu_tileloadd(1, buf, 64); so.emu_tileloadd(2, buf, 64); "
                                 "so.emu_tdpbf16ps(0, 1, 2); so.emu_tilerelease()")
    assert done.returncode == 0 and done.stdout.strip() == "no fault", done.stderr[-500:]
