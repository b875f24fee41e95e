"""Native CPU products (fp32 and bf16) for ``SparseLayer.cpu_inference`` and for the layers' CPU training
step: a small C library, ``sparse_cpu.c``, compiled with the machine's C compiler into an
ignored build folder and called through ctypes with tensors' data pointers (no torch headers,
~1-2 s to build).

Formats: the weight's elements as CSR with 2-byte column indices when in <= 65536 (4-byte
otherwise) - fan-in, b = 1 diagonals, unstructured - and, for one token, block diagonals as a
BSR of transposed b x b blocks (one index per block). x [T, in] fp32 -> y [T, out] fp32, or in
bf16: the weight stored in bf16 (2 bytes a weight), x widened to fp32 in the token tiles, fp32
sums, y rounded to bf16 (to nearest even, as torch) - what nn.Linear computes under CPU
autocast. The
speed comes from the bytes moved (fan-in 6 bytes per weight against a dense layer's 4 / density)
and not from a vendor's sparse routine; torch's MKL path stays the fallback. For training,
``csr_matmul`` (W @ dense_t for a CSR W: forward and input gradient) and ``sddmm`` (the weight
gradient at the stored elements) take the same arguments as the torch functions they stand in
for (kernels.sparse.csr_matmul, kernels.sddmm's element dots) and return None where they do
not apply; for b x b blocks with 8 | b (DiagLinear b = 8 / 16 / 32 / 64, and several-token
inference of such blocks) ``bsr_matmul`` (forward, and the input gradient reading the same
blocks transposed) and ``sddmm_blocks`` (the weight gradient at the stored blocks) do the same
with register tiles that reuse each loaded row for several outputs.

Build: ``python -m kernels.cpu`` (run by .ci/setup), else lazily at the first call. Variants
from one source, chosen from the CPU's flags in /proc/cpuinfo at run time (so a build never
runs instructions the machine lacks): ``amx`` (amx_tile + amx_bf16 + AVX-512-BF16: bf16 block
products of 16 x 16 tiles for several tokens, bsr16_mm_amx, and the weight gradient of bf16 dy
and x at 16 | b blocks, sddmm_blocks_amx; and all of avx512-bf16's),
``avx512-bf16`` (one-token bf16 block products by _mm512_dpbf16_ps, bsr16_mv_dpbf16; bf16 CSR
products of 17 or more bf16 tokens on weight pairs, csr_mm_*_dpbf16; the weight gradient of bf16
dy and x on token pairs, sddmm_tiles_dpbf16; bf16 block products of several tokens for 16 | b -
forward and input gradient by bsr16_mm_dpbf16 on 16 x 16 VNNI sub-blocks, the weight gradient by
sddmm_blocks_dpbf16 on token pairs - which the amx build leaves to its tiles where it has them),
``avx2`` (``-mavx2
-mfma``) and ``-march=x86-64`` otherwise (``-O3`` alone off x86); ``features()`` names the
optional kernels the loaded build can run (AMX also needs Linux's arch_prctl permission, asked
at load, and its kernels' first-run check in a child process, once per build and CPU:
PROBE_ENV). No compiler, a failed build or ``KERNELS_NATIVE_CPU=0``: ``lib()`` is None and the
caller keeps torch's path.

Memory: the products' temporaries (x packed into tiles, blocks into VNNI sub-blocks) live in
per-thread workspaces that are reused from call to call (``workspace``; ``release_workspaces()``
frees them), each as large as the largest it has held - at ViT-B/16's batch 32 (6304 tokens)
~80 MB in bf16 (two slots of a packed [6304, 3072] operand: the weight gradient's dy and x),
twice that in fp32. The CSR products write y
themselves, 64 rows' sums at a time, with no buffer of all of them.

``KERNELS_CPU_VARIANT=<name>`` forces one of VARIANTS (``amx``, ``avx512-bf16``, ``avx2``,
``x86-64``, ``generic``, ``emu``) instead of the choice from the CPU's flags, with no fall back
to a narrower one: a name not in VARIANTS raises ValueError and a variant this CPU cannot run
RuntimeError (naming the missing flags), at the first ``lib()``. ``emu`` is the AVX2 build with
the AMX and AVX-512-BF16 kernels compiled from their same source onto portable C of those
instructions (``sparse_cpu.c``, SPARSE_CPU_EMU: Intel's documented operation, rounding and
faults): it runs wherever avx2 and fma are, reports all of them in ``features()``, and is
there so that tests run those kernels' logic on CPUs without the instructions - never for
speed (it is never chosen by itself)::

    KERNELS_CPU_VARIANT=emu python -m pytest -q tests/kernels/test_cpu_native.py

Example:
    >>> rows, cols = layer.coords()                                      # once per pattern
    >>> w = kernels.cpu.csr_weight(rows, cols, layer.values, 768, 3072)
    >>> y = kernels.cpu.matmul(w, x, layer.bias)                         # x [T, 3072] fp32
    >>> p = kernels.cpu.matvec_plan(w, layer.bias, x1.shape, (1, 768))   # one token, resolved once
    >>> y1 = kernels.cpu.matvec(p, x1)                                   # x1 [1, 3072] fp32
    >>> g = kernels.cpu.sddmm(dy, x, rows, cols)                         # dW at the stored weights
    >>> y = kernels.cpu.bsr_matmul(crow, bcols, blocks, 48, 192, x)      # 16 x 16 blocks, 3072 -> 768
    >>> gb = kernels.cpu.sddmm_blocks(dy, x, brow, bcol, 16)             # dW at the stored blocks
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runtime as rt
from ..coords import csr_structure

SOURCE = Path(__file__).with_name("sparse_cpu.c")
ABI = 13
# Columns per panel of the several-token CSR (see CSR_MM in sparse_cpu.c): 512 x 32 tokens x
# 4 B = 64 KB of x per panel, in L2 (256 to 1024 timed alike at T = 8 and 32 on the loaded
# EPYC; 128 columns and one panel ~10-30% slower).
PANEL = 512
_state: dict = {}
_lock = threading.Lock()


def _l2_bytes(cache: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The L2 cache of cpu0 in bytes (Linux sysfs: "512K", "1024K", "2048K"), None where unknown."""
    try:
        for idx in sorted(cache.glob("index*")):
            if (idx / "level").read_text().strip() == "2":
                size = (idx / "size").read_text().strip().upper()
                return int(size.rstrip("KMB")) * {"K": 1024, "M": 1024 ** 2}.get(size.rstrip("B")[-1:], 1)
    except (OSError, ValueError):
        pass
    return None


def tile_bytes(l2: int | None) -> int:
    """The budget of a token tile of x: half the L2, at least 256 KB (see TILE_BYTES)."""
    return max(256 * 1024, (l2 or 0) // 2)


# Token tiles (see csr_mm_* and sddmm_tiles in sparse_cpu.c) as wide as fit: the tile of x that
# every stored weight reads a row of, n_in x tw x 4 B (2 B for the bf16 tiles), within half of
# the L2 (at least 256 KB). Zen 3 (512 KB L2), T = 197 on the loaded EPYC, Linear 3072 -> 768 at
# 90%: 4.4 ms at 16 tokens vs 5.9 at 32; 768 -> 3072: 2.9 at 32 vs 3.9 at 16. Zen 4 (1 MB L2),
# 256 tokens, one thread, 512 KB against 256 KB, run after run: the bf16 weight gradient of
# fan-in (sddmm_rows_dpbf16) 1.78-1.89 against 2.32-2.34 ms, fp32 (sddmm_rows) 3.38-3.55 against
# 3.73-3.80, b = 16's elements in fp32 3.72-3.86 against 4.45-4.60; fan-in's bf16 step 7.3-7.6
# against 7.9-8.4 ms.
TILE_BYTES = tile_bytes(_l2_bytes())
# Below this many multiply-adds a call stays on one thread: a batch-1 Linear(3072 -> 768) at
# 90% is 236k, a product of tens of microseconds that a hand-off to other threads would not pay
# for; ViT-B's sparse layers at 197 tokens are 12-46M.
PARALLEL_MIN_FMAS = 2_000_000
PARALLEL_ARGS = 16  # (sparse_cpu.c's parallel_rows: the arguments it passes after r0, r1)
# Elements from which a pack (x or dy into the products' layouts) splits over the threads too:
# a pack moves ~4-8 elements a ns on one Zen 4 core (bf16 [1576, 768] ~0.3 ms, [6304, 3072]
# 1.5-6 ms), so from here it pays for waking the team.
PARALLEL_MIN_PACK = 1 << 18
# Split the products over torch's OpenMP threads (parallel_rows) where features() has "openmp";
# False: over a Python thread pool (the tests run both).
SPLIT_ON_OPENMP = True
# Fewest tokens that take the AVX-512-BF16 CSR product (csr_mm_*_dpbf16, tiles of 32 tokens) where
# the build has it: up to 16 the fp32 loop's 8- / 16-token tiles do a half or less of the
# 32-token tile's token slots (per weight ~1 cycle either way in sparse_cpu.c's model; not timed).
DPBF16_MIN_TOKENS = 17


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_instructions() -> bool | None:
    """Whether this x86-64 CPU has bf16 arithmetic (avx512_bf16 or amx_bf16, which torch's
    oneDNN bf16 GEMM and this library's AVX-512-BF16 / AMX kernels use); None where it cannot
    tell (another architecture, no /proc/cpuinfo)."""
    flags = _cpu_flags()
    if not _x86_64() or not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def amx_instructions() -> bool:
    """Whether this CPU has AMX bf16 tiles (``amx_bf16`` and ``amx_tile`` in /proc/cpuinfo), which
    torch's oneDNN bf16 GEMM and its CPU flash attention use there (read once: ~75 us a read)."""
    return {"amx_bf16", "amx_tile"} <= _cpu_flags()


AVX2_FLAGS = ["-mavx2", "-mfma"]
AVX512_BF16_FLAGS = [*AVX2_FLAGS, "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
AMX_FLAGS = [*AVX512_BF16_FLAGS, "-mamx-tile", "-mamx-bf16"]
# the AVX2 build with bsr16_mm_amx and bsr16_mv_dpbf16 on emulated instructions (sparse_cpu.c's
# SPARSE_CPU_EMU): for tests, chosen only by KERNELS_CPU_VARIANT=emu
EMU_FLAGS = [*AVX2_FLAGS, "-DSPARSE_CPU_EMU"]
# /proc/cpuinfo flags each build needs beyond avx2 + fma
_AVX512_BF16_CPU = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "f16c"}
_AMX_CPU = _AVX512_BF16_CPU | {"amx_tile", "amx_bf16"}
# widest first: where a build fails (a compiler without -mamx-tile), lib() takes the next one
# (never "emu", which only KERNELS_CPU_VARIANT names)
VARIANTS = {"amx": AMX_FLAGS, "avx512-bf16": AVX512_BF16_FLAGS, "avx2": AVX2_FLAGS, "x86-64": ["-march=x86-64"],
            "generic": [], "emu": EMU_FLAGS}
# the /proc/cpuinfo flags each x86-64 variant runs on
_VARIANT_CPU = {"amx": {"avx2", "fma"} | _AMX_CPU, "avx512-bf16": {"avx2", "fma"} | _AVX512_BF16_CPU,
                "avx2": {"avx2", "fma"}, "emu": {"avx2", "fma"}, "x86-64": set()}
VARIANT_ENV = "KERNELS_CPU_VARIANT"


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def variant() -> tuple[str, list[str]]:
    """(name, compiler flags) of the build this CPU runs: the one ``KERNELS_CPU_VARIANT`` names,
    else the widest of VARIANTS its flags allow. Raises ValueError for a name not in VARIANTS,
    RuntimeError for a variant this CPU cannot run."""
    forced = os.environ.get(VARIANT_ENV)
    if forced:
        return forced, _runnable(forced)
    if not _x86_64():
        return "generic", []
    flags = _cpu_flags()
    if {"avx2", "fma"} <= flags:
        if _AMX_CPU <= flags:
            return "amx", AMX_FLAGS
        if _AVX512_BF16_CPU <= flags:
            return "avx512-bf16", AVX512_BF16_FLAGS
        return "avx2", AVX2_FLAGS
    return "x86-64", VARIANTS["x86-64"]


def _runnable(name: str) -> list[str]:
    """The flags of variant ``name`` (as KERNELS_CPU_VARIANT named it) where this CPU runs it."""
    if name not in VARIANTS:
        raise ValueError(f"{VARIANT_ENV}={name!r} is not a variant; choose one of {', '.join(VARIANTS)}")
    if name == "generic":
        return VARIANTS[name]
    if not _x86_64():
        raise RuntimeError(f"{VARIANT_ENV}={name}: an x86-64 build, and this machine is {platform.machine()}")
    missing = _VARIANT_CPU[name] - _cpu_flags()
    if missing:
        model = _cpu_model()
        raise RuntimeError(f"{VARIANT_ENV}={name}: this CPU ({model}) lacks {', '.join(sorted(missing))}"
                           + ("; KERNELS_CPU_VARIANT=emu runs those kernels on emulated instructions wherever "
                              "avx2 and fma are" if name in ("amx", "avx512-bf16") else ""))
    return VARIANTS[name]


def build_dir() -> Path:
    """``KERNELS_CPU_BUILD_DIR``, else kernels/cpu/_build (git-ignored) when writable, else a
    per-user cache folder."""
    env = os.environ.get("KERNELS_CPU_BUILD_DIR")
    if env:
        return Path(env)
    here = Path(__file__).with_name("_build")
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here
    except OSError:
        pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse-dst-kernels"


def build(name: str | None = None) -> Path:
    """Compile the library for this CPU - or the variant ``name`` of VARIANTS, which the tests
    build on CPUs that cannot run it - (if not built already) and return its path. The name
    carries a hash of the source and flags, so an edited source is rebuilt. Raises
    RuntimeError (no compiler, compile error)."""
    name, flags = variant() if name is None else (name, VARIANTS[name])
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc / cc / $CC) found")
    src = SOURCE.read_bytes()
    folder = build_dir()
    failed = None
    for openmp in (["-fopenmp"], []):  # (parallel_rows; a compiler without OpenMP builds the rest)
        cmd = [cc, "-O3", "-std=c11", "-ffp-contract=fast", "-shared", "-fPIC", *flags, *openmp]
        tag = hashlib.sha1(src + " ".join(cmd[1:]).encode()).hexdigest()[:12]
        target = folder / f"sparse_cpu-{name}-{tag}.so"
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # concurrent builds: each its own file
        os.close(fd)
        try:
            done = subprocess.run([*cmd, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            failed = f"{cc} failed ({done.returncode}): {done.stderr.strip()[:500]}"
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"building {SOURCE.name} failed: {e}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(failed)


def _declare(so: ctypes.CDLL) -> ctypes.CDLL:
    i64, p = ctypes.c_int64, ctypes.c_void_p
    for f in ("csr_mv_i16", "csr_mv_i32"):
        getattr(so, f).argtypes = [i64, i64, p, p, p, p, p, p]
        getattr(so, f).restype = None
    for f in ("csr_mv_i16_bf16", "csr_mv_i32_bf16"):  # (+ the fp32 scratch of x, how much to widen)
        getattr(so, f).argtypes = [i64, i64, p, p, p, p, p, i64, p, p]
        getattr(so, f).restype = None
    for f in ("csr_mm_i16", "csr_mm_i32", "csr_mm_i16_bf16", "csr_mm_i32_bf16"):
        getattr(so, f).argtypes = [i64] * 7 + [p] * 6 + [i64, ctypes.c_int, p]
        getattr(so, f).restype = ctypes.c_int
    for f in ("bsr_mv", "bsr_mv_bf16"):
        getattr(so, f).argtypes = [i64, i64, i64, p, p, p, p, p, p]
        getattr(so, f).restype = None
    for f in ("pack_tokens", "pack_tokens_bf16"):  # (the packs' last argument: their threads)
        getattr(so, f).argtypes = [i64, i64, p, i64, i64, i64, p, i64]
        getattr(so, f).restype = None
    for f in ("unpack_tokens", "unpack_tokens_bf16"):
        getattr(so, f).argtypes = [i64, i64, i64, i64, i64, p, p, i64]
        getattr(so, f).restype = None
    so.sddmm_tiles.argtypes = [i64] * 6 + [p] * 5
    so.sddmm_rows.argtypes = [i64] * 6 + [p] * 5
    so.sddmm_tiles.restype = ctypes.c_int
    so.bsr_mm.argtypes = [i64] * 7 + [p] * 4 + [i64, i64] + [p] * 3
    so.bsr_mm.restype = ctypes.c_int
    so.sddmm_blocks.argtypes = [i64] * 4 + [p] * 3 + [i64, i64, p, i64, i64, p]
    for f in ("pack_blocks", "pack_blocks_bf16"):
        getattr(so, f).argtypes = [i64, i64, p, i64, i64, i64, p, i64]
        getattr(so, f).restype = None
    so.sddmm_blocks.restype = ctypes.c_int
    for f in ("bf16_to_f32", "f32_to_bf16"):
        getattr(so, f).argtypes = [i64, p, p]
        getattr(so, f).restype = None
    so.col_sums_bf16.argtypes = [i64, i64, i64, p, i64, p]
    so.col_sums_bf16.restype = None
    so.sparse_cpu_features.restype = ctypes.c_int
    built = so.sparse_cpu_features()
    if built & 1:
        so.bsr16_mm_amx.argtypes = [i64, i64, i64, p, p, p, p, i64, p, p, i64, ctypes.c_int]
        so.bsr16_mm_amx.restype = ctypes.c_int
        so.sddmm_blocks_amx.argtypes = [i64] * 6 + [p] * 5
        so.sddmm_blocks_amx.restype = ctypes.c_int
        so.pack_token_pairs.argtypes = [i64, i64, p, i64, i64, i64, p, i64]
        so.pack_token_pairs.restype = None
        so.sparse_cpu_amx_init.restype = ctypes.c_int
    if built & 2:
        so.bsr16_mv_dpbf16.argtypes = [i64, i64, p, p, p, p, p, p]
        so.bsr16_mv_dpbf16.restype = None
    if built & 4:
        for f in ("csr_mm_i16_dpbf16", "csr_mm_i32_dpbf16"):
            getattr(so, f).argtypes = [i64] * 6 + [p] * 6 + [i64, ctypes.c_int, p]
            getattr(so, f).restype = None
        so.pack_tokens_dpbf16.argtypes = [i64, i64, p, i64, i64, p, i64]
        so.pack_tokens_dpbf16.restype = None
    if built & 8:
        so.sddmm_tiles_dpbf16.argtypes = [i64] * 6 + [p] * 5
        so.sddmm_tiles_dpbf16.restype = ctypes.c_int
        so.sddmm_rows_dpbf16.argtypes = [i64] * 6 + [p] * 5
        so.sddmm_rows_dpbf16.restype = ctypes.c_int
        so.pack_tokens_bf16_tiles.argtypes = [i64, i64, p, i64, i64, i64, p, i64]
        so.pack_tokens_bf16_tiles.restype = None
    if built & 16:
        so.bsr16_mm_dpbf16.argtypes = [i64] * 5 + [p] * 6 + [i64, ctypes.c_int]
        so.bsr16_mm_dpbf16.restype = None
        so.pack_token_pairs16.argtypes = [i64, i64, p, i64, i64, p, i64]
        so.pack_token_pairs16.restype = None
        so.pack_vnni16.argtypes = [i64, i64, i64, p, p, i64, i64, p]
        so.pack_vnni16.restype = None
        so.sddmm_blocks_dpbf16.argtypes = [i64] * 4 + [p] * 5
        so.sddmm_blocks_dpbf16.restype = None
        so.pack_pair_groups.argtypes = [i64, i64, p, i64, i64, i64, p, i64]
        so.pack_pair_groups.restype = None
    so.sparse_cpu_openmp.restype = ctypes.c_int
    if so.sparse_cpu_openmp():
        so.parallel_rows.argtypes = [i64, i64, p, ctypes.c_int, p]
        so.parallel_rows.restype = ctypes.c_int
    so.sparse_cpu_abi.restype = ctypes.c_int
    if so.sparse_cpu_abi() != ABI:
        raise RuntimeError(f"{so._name}: ABI {so.sparse_cpu_abi()}, expected {ABI}")
    return so


def lib() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None when disabled
    (``KERNELS_NATIVE_CPU=0``, inside ``disabled()``) or when it cannot be built or loaded
    (``error()`` says why)."""
    if _off.depth:
        return None
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            so, err = None, None
            if os.environ.get("KERNELS_NATIVE_CPU", "1") == "0":
                err = "disabled by KERNELS_NATIVE_CPU=0"
            else:
                names = [n for n in VARIANTS if n != "emu"]
                first = variant()[0]  # (raises for a KERNELS_CPU_VARIANT this CPU cannot run)
                forced = bool(os.environ.get(VARIANT_ENV))
                tried = []
                for name in [first] if forced or first == "generic" else names[names.index(first):]:
                    try:
                        so = _declare(ctypes.CDLL(str(build(name))))
                        _state["variant"] = name
                        break
                    except (RuntimeError, OSError, AttributeError) as e:
                        tried.append(f"{name}: {type(e).__name__}: {e}")
                err = None if so is not None else "; ".join(tried)
            feats, why = set(), {}
            if so is not None:
                built = so.sparse_cpu_features()
                if built & 2:
                    feats.add("avx512_bf16")
                if built & 4:
                    feats.add("csr_dpbf16")
                if built & 8:
                    feats.add("sddmm_dpbf16")
                if built & 16:
                    feats.add("blocks_dpbf16")
                if so.sparse_cpu_openmp():
                    runtimes = _openmp_runtimes()
                    if len(runtimes) == 1:
                        feats.add("openmp")
                    else:
                        why["openmp"] = (f"the process maps {len(runtimes)} OpenMP runtimes ({', '.join(runtimes)}), "
                                         "not torch's alone: a Python thread pool splits the products")
                else:
                    why["openmp"] = "the library was built without OpenMP (the compiler has no -fopenmp)"
                if built & 1:
                    if so.sparse_cpu_amx_init() != 0:  # Linux: arch_prctl(ARCH_REQ_XCOMP_PERM)
                        why["amx"] = "the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
                    else:
                        failed = _amx_probe(Path(so._name), _state["variant"])
                        if failed is None:
                            feats.add("amx")
                        else:
                            why["amx"] = failed
            _state.update(lib=so, error=err, features=frozenset(feats), features_why=why)
    return _state["lib"]


# The AMX kernels (bsr16_mm_amx, sddmm_blocks_amx) have run only on the emulated build: no AMX CPU
# had been at hand when they were written. So before a process first uses them on a CPU, a child
# process runs both once on small operands against fp64 (``python -m kernels.cpu --probe-amx``,
# ~2 s); if it crashes (an instruction the kernel or the CPU gets wrong ends a process: SIGILL,
# SIGSEGV) or a result is wrong, this process leaves "amx" out of features() - the AVX-512-BF16
# block products run instead - and missing_feature("amx") says what happened. The verdict is
# kept beside the library (<library>.amx-probe, with the CPU's model name), so it runs once per
# build and CPU; a timed-out probe is not kept. KERNELS_CPU_PROBE=0 skips it (the child's own
# setting), =1 probes any build with AMX kernels (the emu build, for tests).
PROBE_ENV = "KERNELS_CPU_PROBE"
PROBE_TIMEOUT_S = 120


def _cpu_model() -> str:
    return next((ln.split(":", 1)[1].strip() for ln in _cpuinfo_lines() if ln.startswith("model name")), "?")


def _probe_marker(so_path: Path) -> Path:
    return so_path.with_name(so_path.name + ".amx-probe")


def _probe_command() -> list[str]:
    return [sys.executable, "-m", __name__, "--probe-amx"]


def _amx_probe(so_path: Path, build: str) -> str | None:
    """None where the AMX kernels of the library at ``so_path`` passed their first run on this CPU
    (now, or as kept beside it), else why not."""
    setting = os.environ.get(PROBE_ENV, "")
    if setting == "0" or (build != "amx" and setting != "1"):
        return None
    marker, model = _probe_marker(so_path), _cpu_model()
    try:
        verdict, seen = marker.read_text().split("\n")[:2]
        if seen == model:
            return None if verdict == "ok" else verdict
    except (OSError, ValueError):
        pass
    env = {**os.environ, PROBE_ENV: "0", VARIANT_ENV: build,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's imports
    try:
        proc = subprocess.run(_probe_command(), env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return (f"the AMX kernels' first-run check (a child process) took over {PROBE_TIMEOUT_S} s; "
                "the AVX-512-BF16 block products run instead, and the next process checks again")
    except OSError as e:
        return f"the AMX kernels' first-run check could not start a child process ({e})"
    if proc.returncode == 0:
        verdict = "ok"
    else:
        steps = "; ".join(f"{name}: {how}" for name, how in amx_steps(so_path))
        verdict = (f"the AMX kernels failed their first run on this CPU ({model}; a child process, "
                   f"{_child_outcome(proc)}); the instructions step by step: {steps}; "
                   f"the AVX-512-BF16 block products run instead (kept in {marker}: delete it to check again)")
    try:
        marker.write_text(f"{verdict}\n{model}\n")
    except OSError:
        pass
    return None if verdict == "ok" else verdict


def _child_outcome(proc: subprocess.CompletedProcess) -> str:
    """How a child process ended: 'killed by SIGILL: <its last line>', 'exit 1: ...'."""
    rc = proc.returncode
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit {rc}"
    return f"{how}: {(proc.stderr.strip() or proc.stdout.strip() or 'no output').splitlines()[-1][:300]}"


# amx_selftest's steps (sparse_cpu.c), each adding an instruction to the ones before
AMX_STEPS = ("arch_prctl's grant of the tile data", "LDTILECFG + TILERELEASE", "TILEZERO + TILESTORED", "TILELOADD",
             "TDPBF16PS")
_AMX_STEP_CHILD = ("import ctypes, sys; "
                   "sys.exit(ctypes.CDLL(sys.argv[1]).amx_selftest(int(sys.argv[2]), int(sys.argv[3])))")
XTILEDATA_BIT = 1 << 18


def _amx_step_command(so_path: Path, step: int, grant: bool) -> list[str]:
    return [sys.executable, "-c", _AMX_STEP_CHILD, str(so_path), str(step), str(int(grant))]


def amx_steps(so_path: Path, grant: bool = True) -> list[tuple[str, str]]:
    """The AMX instructions of the library at ``so_path`` one step at a time (its amx_selftest),
    each step in a child process of its own (ctypes, no torch: ~50 ms) until one fails:
    [(step, "ok" or what went wrong)]. The diagnosis that a failed first-run check adds to its
    message; ``python -m kernels.cpu --amx-steps`` prints it. ``grant=False`` skips the
    arch_prctl request (the tests' fault). A library without AMX kernels: one step saying so."""
    so = ctypes.CDLL(str(so_path))  # (loading runs no tile instruction)
    if not hasattr(so, "amx_selftest"):
        return [("AMX kernels", f"none in {Path(so_path).name}: its build has no AMX")]
    so.amx_xcomp_supported.restype = ctypes.c_int64
    out = []
    for step, name in enumerate(AMX_STEPS, 1):
        if step == 1 and not grant:
            out.append((name, "skipped"))
            continue
        try:
            proc = subprocess.run(_amx_step_command(so_path, step, grant), capture_output=True, text=True,
                                  timeout=60)
        except subprocess.TimeoutExpired:
            out.append((name, "no answer in 60 s"))
            break
        if proc.returncode == 0:
            out.append((name, "ok"))
            continue
        if proc.returncode == step == 1:
            supported = so.amx_xcomp_supported()
            out.append((name, "refused (this kernel's arch_prctl(ARCH_GET_XCOMP_SUPP) is "
                              + ("unavailable" if supported < 0 else f"{supported:#x}, XTILEDATA "
                                 + ("supported" if supported & XTILEDATA_BIT else "not supported")) + ")"))
        elif proc.returncode == step:
            out.append((name, "a wrong result"))
        else:
            out.append((name, _child_outcome(proc)))
        break
    return out


def _probe_amx_run() -> str | None:
    """In the child: bsr16_mm_amx and sddmm_blocks_amx once on small bf16 operands (b = 16, 17
    and 45 tokens: a partial tile each), against fp64 of the same bf16 numbers; None where both
    are right, else what is wrong."""
    if lib() is None or "amx" not in features():
        return f"no AMX kernels to check: {error() or missing_feature('amx')}"
    g = torch.Generator().manual_seed(0)
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)  # 2 x 3 blocks of 16: (0, 0), (0, 2), (1, 1)
    bcols = torch.tensor([0, 2, 1], dtype=torch.int32)
    blocks = torch.randn(3, 16, 16, generator=g).to(torch.bfloat16)
    bias = torch.randn(32, generator=g)
    dense = torch.zeros(32, 48, dtype=torch.float64)
    for n, (r, c) in enumerate(((0, 0), (0, 2), (1, 1))):
        dense[16 * r:16 * r + 16, 16 * c:16 * c + 16] = blocks[n].double()
    x = torch.randn(17, 48, generator=g).to(torch.bfloat16)
    y = matmul(bsr16_weight(crow, bcols, blocks, 32, 48), x, bias, out_dtype=torch.float32)
    ref = x.double() @ dense.t() + bias.double()
    bound = 1e-5 * (x.double().abs() @ dense.abs().t() + bias.double().abs()) + 1e-6
    if not ((y.double() - ref).abs() <= bound).all():
        return f"bsr16_mm_amx: max error {(y.double() - ref).abs().max().item():.3g} against fp64"
    dy = torch.randn(45, 32, generator=g).to(torch.bfloat16)
    x = torch.randn(45, 48, generator=g).to(torch.bfloat16)
    rows = torch.tensor([0, 0, 1], dtype=torch.int32)
    got = sddmm_blocks(dy, x, rows, bcols, 16)
    d, xd = dy.double(), x.double()
    for n, (r, c) in enumerate(zip(rows.tolist(), bcols.tolist())):
        a, b = d[:, 16 * r:16 * r + 16], xd[:, 16 * c:16 * c + 16]
        err = (got[n].double() - a.t() @ b).abs()
        if not (err <= 1e-5 * (a.abs().t() @ b.abs()) + 1e-6).all():
            return f"sddmm_blocks_amx: block {n}, max error {err.max().item():.3g} against fp64"
    return None


def _openmp_runtimes(maps: Path = Path("/proc/self/maps")) -> list[str]:
    """The OpenMP runtimes this process maps (libgomp, libiomp, libomp: their files), [] where
    unknown. One means the library's parallel_rows runs on torch's own threads."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    names = {line.split()[-1] for line in lines if len(line.split()) >= 6}
    return sorted(n for n in names if re.match(r"lib(gomp|iomp\d*|omp)[-.]", Path(n).name))


class _Off(threading.local):
    depth = 0


_off = _Off()


@contextlib.contextmanager
def disabled():
    """Within it (this thread), ``lib()`` is None: the layers take torch's path (benchmarks
    and tests compare the two)."""
    _off.depth += 1
    try:
        yield
    finally:
        _off.depth -= 1


def loaded_variant() -> str | None:
    """The variant of the loaded library (variant()'s, or a narrower one where that failed to build)."""
    return _state.get("variant") if lib() is not None else None


def features() -> frozenset[str]:
    """The optional kernels the loaded library can run here: "amx" (bsr16_mm_amx, several tokens),
    "avx512_bf16" (bsr16_mv_dpbf16, one token), "csr_dpbf16" (csr_mm_*_dpbf16: bf16 CSR products
    of several tokens by AVX-512-BF16), "sddmm_dpbf16" (sddmm_tiles_dpbf16: the weight gradient
    of bf16 dy and x by AVX-512-BF16) and "blocks_dpbf16" (bsr16_mm_dpbf16 and sddmm_blocks_dpbf16:
    bf16 block products of several tokens with 16 | b, forward, input gradient and weight
    gradient, by AVX-512-BF16), the last four in the avx512-bf16 and amx builds; empty without
    the library or on CPUs without them (the AVX2 / x86-64 builds); all five in the emu build
    (on emulated instructions)."""
    return _state.get("features", frozenset()) if lib() is not None else frozenset()


def missing_feature(name: str) -> str:
    """Why ``name`` is not in ``features()`` (for skip reasons and logs)."""
    if lib() is None:
        return f"no native library: {error()}"
    if name in _state.get("features_why", {}):
        return _state["features_why"][name]
    need = {"amx": "amx_tile, amx_bf16", "avx512_bf16": "avx512_bf16", "csr_dpbf16": "avx512_bf16",
            "sddmm_dpbf16": "avx512_bf16", "blocks_dpbf16": "avx512_bf16"}[name]
    model = _cpu_model()
    build = loaded_variant()
    if set(need.split(", ")) <= _cpu_flags():  # (a narrower build than the CPU allows)
        how = f"forced by {VARIANT_ENV}" if os.environ.get(VARIANT_ENV) else "a narrower build loaded"
        return f"the {build} build ({how}) has no {name} kernels; this CPU ({model}) has {need}"
    return f"this CPU ({model}, the {build} build) lacks {need}"


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()[:64]
    except OSError:
        return []


def error() -> str | None:
    """Why ``lib()`` is None (after it was asked), else None."""
    return _state.get("error")


def reset() -> None:
    """Forget the loaded library so the next ``lib()`` looks again (tests, environment changes)."""
    with _lock:
        _state.clear()


def available() -> bool:
    return lib() is not None


@dataclass
class NativeWeight:
    """A layer's weight in the library's layout. ``kind`` 'csr' (elements, any tokens), 'bsr'
    (b x b blocks transposed: one token, and several for 8 | b through bsr_matmul) or 'bsr16' (bf16 16 x 16 blocks in the VNNI layout of
    the AMX and AVX-512-BF16 kernels, [n][k / 2][i][k % 2] = W[i, k] of block n: any tokens with
    "amx", one with "avx512_bf16"); ``index``: 16 or 32 (bits of a column index);
    ``values`` fp32 or bf16 (the products then widen each weight to fp32 where it is used)."""
    kind: str
    n_out: int
    n_in: int
    crow: torch.Tensor      # int32 [rows + 1] (block rows for BSR)
    cols: torch.Tensor      # int16 bits of uint16, or int32 [nnz] (block columns for BSR)
    values: torch.Tensor    # fp32 / bf16 [nnz] (CSR) or [n, b, b] with [n][j][i] = W[i, j] of block n
    block: int = 1
    index: int = 32
    panels: int = 1         # CSR in column panels of PANEL columns (several tokens), see csr_weight
    pairs: torch.Tensor | None = None  # bf16 [nnz]: fp32 values' bf16 copy for csr_mm_*_dpbf16, see csr_weight

    def one_token(self, so: ctypes.CDLL) -> tuple:
        """(function, leading arguments) of the one-token product: rows [0, n_rows) and the
        weight's pointers; x, bias and y follow (for a bf16 CSR - ``widens`` - x, an fp32
        scratch of n_in, the count to widen into it, bias and y)."""
        bf = "_bf16" if self.values.dtype == torch.bfloat16 else ""
        if self.kind == "bsr16":
            fn, lead = so.bsr16_mv_dpbf16, (0, self.n_rows)
        elif self.kind == "bsr":
            fn, lead = getattr(so, "bsr_mv" + bf), (0, self.n_rows, self.block)
        else:
            fn, lead = getattr(so, f"csr_mv_i{self.index}{bf}"), (0, self.n_rows)
        return fn, (*lead, self.crow.data_ptr(), self.cols.data_ptr(), self.values.data_ptr())

    @property
    def widens(self) -> bool:
        """Whether the one-token product widens x into an fp32 scratch first (bf16 CSR)."""
        return self.kind == "csr" and self.values.dtype == torch.bfloat16

    @property
    def n_rows(self) -> int:
        return (self.crow.numel() - 1) // self.panels

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.cols, self.values, self.pairs)
                   if t is not None)

    @property
    def bf16_values(self) -> torch.Tensor | None:
        """The values as bf16 (those, or their ``pairs`` copy), for csr_mm_*_dpbf16; None for fp32
        values without the copy."""
        return self.values if self.values.dtype is torch.bfloat16 else self.pairs


@dataclass(frozen=True)
class MatVec:
    """A one-token product with its arguments resolved once (``matvec_plan``): what
    ``matvec`` needs besides x. Holds the weight and the bias it points into."""
    lib: ctypes.CDLL
    fn: object                          # the library function (csr_mv_i16 / _i32, bsr_mv)
    lead: tuple                         # its arguments before x (rows, the weight's pointers), as ctypes values
    weight: NativeWeight
    bias: torch.Tensor | None           # fp32, contiguous
    bias_ptr: ctypes.c_void_p | None
    x_shape: torch.Size                 # the x it takes: any shape of in_features elements
    y_shape: tuple[int, ...]            # the y it returns (n_out elements)
    parallel: bool                      # big enough to split over threads (PARALLEL_MIN_FMAS)
    dtype: torch.dtype = torch.float32  # of x, y and the weight: fp32 or bf16
    scratch: threading.local | None = None  # (bf16 CSR) each thread's fp32 copy of x, .xf

    @property
    def kind(self) -> str:
        return self.weight.kind


def matvec_plan(w: NativeWeight, bias: torch.Tensor | None, x_shape: torch.Size, y_shape: tuple[int, ...]) -> MatVec:
    """The one-token product of ``w`` (CSR without panels, or BSR) for x of ``x_shape`` (one
    token: ``w.n_in`` elements) -> y of ``y_shape``, both in the weight's dtype (fp32 or bf16),
    with ``bias`` [out] or None (added to the fp32 sums). Needs ``lib()``; the plan is valid
    while w and bias are (the caller watches them)."""
    so = lib()
    if so is None:
        raise RuntimeError(f"the native CPU library is unavailable: {error()}")
    if w.panels != 1 or math.prod(x_shape) != w.n_in or math.prod(y_shape) != w.n_out:
        raise ValueError(f"a one-token plan needs an unpanelled weight and {w.n_in} -> {w.n_out} "
                         f"elements, got {tuple(x_shape)} -> {tuple(y_shape)}")
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    fn, lead = w.one_token(so)
    # as ctypes values of the declared types, which a call passes on as they are (~0.2 us of a
    # ~0.9 us call with 8 Python ints)
    lead = tuple(kind(a) for kind, a in zip(fn.argtypes, lead))
    bias_ptr = None if bias is None else ctypes.c_void_p(bias.data_ptr())
    return MatVec(so, fn, lead, w, bias, bias_ptr, torch.Size(x_shape), tuple(y_shape),
                  w.values.numel() >= PARALLEL_MIN_FMAS, w.values.dtype,
                  threading.local() if w.widens else None)


def matvec(p: MatVec, x: torch.Tensor) -> torch.Tensor:
    """y = W x + bias for one token by a plan from ``matvec_plan``: x of ``p.dtype``,
    contiguous, of ``p.x_shape`` (unchecked: the caller checked it) -> y of ``p.y_shape``.

    A batch-1 product takes ~20-100 us (Linear 3072 -> 768 at 90%), so this is the whole
    Python around it: an allocation (~0.8 us) and a ctypes call (~0.8 us). (In bf16 the
    library reads bf16 x and writes bf16 y itself: two torch casts around an fp32 product
    cost ~3.8 us each on the loaded EPYC, ~8% of the fan-in product.)"""
    if p.parallel and torch.get_num_threads() > 1:
        return matmul(p.weight, x.reshape(1, -1), p.bias).reshape(p.y_shape)
    y = torch.empty(*p.y_shape, dtype=p.dtype)
    if p.scratch is None:
        p.fn(*p.lead, x.data_ptr(), p.bias_ptr, y.data_ptr())
        return y
    xf = getattr(p.scratch, "xf", None)
    if xf is None:
        xf = p.scratch.xf = torch.empty(p.weight.n_in)
    p.fn(*p.lead, x.data_ptr(), xf.data_ptr(), p.weight.n_in, p.bias_ptr, y.data_ptr())
    return y


def csr_weight(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_out: int, n_in: int,
               panels: bool = False, dtype: torch.dtype = torch.float32) -> NativeWeight:
    """Elements at (rows, cols) (any order, each once) -> NativeWeight: a CSR (rows sorted,
    columns sorted within a row), with ``panels`` stored panel by panel of PANEL columns (for
    several tokens); 2-byte column indices when ``n_in <= 65536``; values in ``dtype`` (fp32
    or bf16, rounded to nearest even as ``.to`` does). A bf16 weight with ``panels`` keeps the
    bf16-rounded values in fp32: each weight then serves a tile of up to 32 tokens, so its
    bytes hardly count, and widening it there (a scalar load, shift and broadcast per weight)
    cost 5-10% at 32 / 256 tokens on the EPYC (DiagLinear b = 16 3072 -> 768 at 90%); where the
    loaded build has "csr_dpbf16" it keeps a bf16 copy too (``pairs``, 2 bytes a weight), which
    products of DPBF16_MIN_TOKENS or more bf16 tokens read."""
    rows, cols = rows.long(), cols.long()
    n_panels = -(-n_in // PANEL) if panels else 1
    key = ((cols // PANEL) * n_out + rows) * n_in + cols if panels else rows * n_in + cols
    order = torch.argsort(key)
    seg = key[order] // n_in  # panel * n_out + row
    crow = torch.searchsorted(seg, torch.arange(n_panels * n_out + 1)).to(torch.int32)
    c = cols[order]
    if n_in <= 65536:
        cols_native, index = torch.where(c >= 32768, c - 65536, c).to(torch.int16), 16  # uint16 bits
    else:
        cols_native, index = c.to(torch.int32), 32
    vals = values.detach().to(_value_dtype(dtype)).reshape(-1)[order]
    pairs = None
    if panels and vals.dtype is torch.bfloat16:
        pairs = vals.contiguous() if "csr_dpbf16" in features() else None
        vals = vals.to(torch.float32)
    return NativeWeight("csr", n_out, n_in, crow, cols_native.contiguous(), vals.contiguous(), 1, index, n_panels,
                        pairs)


def bsr_weight(crow: torch.Tensor, bcols: torch.Tensor, blocks: torch.Tensor, n_out: int, n_in: int,
               dtype: torch.dtype = torch.float32, several: bool = False) -> NativeWeight:
    """BSR (block rows sorted) of blocks [n, b, b] -> NativeWeight, the blocks in ``dtype`` (fp32
    or bf16). ``several``: for products of several tokens (bsr_matmul, b a multiple of 8), which
    read fp32 blocks: bf16 values are rounded to bf16 and kept as fp32 (each block serves a tile
    of tokens, so its bytes hardly count)."""
    b = blocks.shape[-1]
    vals = blocks.detach().to(_value_dtype(dtype))
    if several:
        vals = vals.to(torch.float32)
    return NativeWeight("bsr", n_out, n_in, crow.to(torch.int32).contiguous(), bcols.to(torch.int32).contiguous(),
                        vals.transpose(1, 2).contiguous(), b, 32)


def bsr16_weight(crow: torch.Tensor, bcols: torch.Tensor, blocks: torch.Tensor, n_out: int, n_in: int) -> NativeWeight:
    """BSR (block rows sorted) of blocks [n, b, b] (blocks[n][i][j] = W[i, j] of block n), b a
    multiple of 16 -> NativeWeight 'bsr16': each block cut into 16 x 16 blocks, in bf16 and the
    VNNI layout of bsr16_mm_amx / bsr16_mv_dpbf16."""
    b = blocks.shape[-1]
    if b % 16 or n_out % 16 or n_in % 16:
        raise ValueError(f"bsr16 needs 16 | b, out and in, got b={b}, {n_out} x {n_in}")
    q, n = b // 16, blocks.shape[0]
    brow = torch.repeat_interleave(torch.arange(crow.numel() - 1), (crow[1:] - crow[:-1]).long())
    io = torch.arange(q)
    rows = (brow[:, None, None] * q + io[:, None]).expand(n, q, q).reshape(-1)
    cols = (bcols.long()[:, None, None] * q + io[None, :]).expand(n, q, q).reshape(-1)
    sub = blocks.detach().to(torch.bfloat16).reshape(n, q, 16, q, 16).permute(0, 1, 3, 2, 4).reshape(-1, 16, 16)
    order, crow16, cols16 = csr_structure(rows.to(torch.int32), cols.to(torch.int32), n_out // 16, n_in // 16)
    if order is not None:
        sub = sub[order]
    vnni = sub.reshape(-1, 16, 8, 2).permute(0, 2, 1, 3).contiguous()  # [n][k / 2][i][k % 2]
    return NativeWeight("bsr16", n_out, n_in, crow16.to(torch.int32).contiguous(), cols16.to(torch.int32).contiguous(),
                        vnni, 16, 32)


def bsr16_dense(w: NativeWeight) -> torch.Tensor:
    """The dense [out, in] fp32 weight of a 'bsr16' NativeWeight (tests: its layout)."""
    dense = torch.zeros(w.n_out, w.n_in)
    counts = (w.crow[1:] - w.crow[:-1]).long()
    rb = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    blocks = w.values.float().permute(0, 2, 1, 3).reshape(-1, 16, 16)  # [n][i][k]
    for n in range(blocks.shape[0]):
        r, c = int(rb[n]) * 16, int(w.cols[n]) * 16
        dense[r:r + 16, c:c + 16] += blocks[n]
    return dense


def block_kernel(tokens: int) -> bool:
    """Whether bf16 block products of ``tokens`` tokens have a kernel of 16 x 16 tiles here
    ('bsr16': AMX or else AVX-512-BF16 for several tokens, AVX-512-BF16 for one)."""
    f = features()
    return "avx512_bf16" in f if tokens == 1 else bool(f & {"amx", "blocks_dpbf16"})


def _value_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the native weights are fp32 or bf16, got {dtype}")
    return dtype


def _tile_width(T: int, width: int, choices, elem_bytes: int = 4) -> int:
    """Tokens per tile: the fewest multiple of 8 in ``choices`` covering T, at most the widest
    whose width x tw x elem_bytes tile fits TILE_BYTES (never below the smallest choice)."""
    fit = [tw for tw in choices if width * tw * elem_bytes <= TILE_BYTES] or [choices[0]]
    return min(max(fit), next((tw for tw in choices if tw >= T), choices[-1]))


# The products' temporaries (x packed into token tiles, fp32 sums before they are unpacked) are
# reused between calls, per thread and per slot, so that a large one does not come back from
# the OS as fresh pages on every call: glibc hands allocations of more than its mmap threshold
# (at most 32 MB) straight to mmap and back to munmap, and first-touch page faults then cost
# more than the product (Linear 768 -> 3072 at 90%, 6304 tokens, bf16 under autocast, one
# thread, the EPYC Zen 4: a fan-in training step 305 ms, 174 ms with glibc told to keep its
# memory; see bench/results/cpu_check/). A workspace grows to the largest temporary its slot
# has held, up to WORKSPACE_MAX_BYTES (a slot's largest at ViT-B/16's batch 32, 6304 tokens: a
# packed fp32 [6304, 3072], 77 MB); bigger ones are allocated per call, so a rare huge call
# leaves nothing behind.
WORKSPACE_MAX_BYTES = 256 << 20


class _Workspaces(threading.local):
    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}


_workspaces = _Workspaces()


def workspace(slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous uninitialised tensor of ``shape`` for a temporary of one product call, in
    this thread's reused buffer ``slot`` (one name per temporary alive at the same time; never
    return it to the caller: the next call of the slot overwrites it)."""
    n = math.prod(shape) * dtype.itemsize
    if n > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    buf = _workspaces.buffers.get(slot)
    if buf is None or buf.numel() < n:
        _workspaces.buffers.pop(slot, None)  # (freed before its successor is allocated)
        buf = _workspaces.buffers[slot] = torch.empty(n, dtype=torch.uint8)
    return buf[:n].view(dtype).view(shape)


def release_workspaces() -> int:
    """Free this thread's workspaces (they are rebuilt on the next call); returns the bytes freed."""
    freed = sum(b.numel() for b in _workspaces.buffers.values())
    _workspaces.buffers.clear()
    return freed


_pool: ThreadPoolExecutor | None = None


def _split(n_rows: int, fmas: int, fn, *args) -> int:
    """fn(r0, r1, *args) over [0, n_rows), on torch's thread count when the product is big enough;
    returns the OR of the calls' results (0 for a function that returns nothing). fn is a
    function of the library (its other arguments integers or pointers, None for NULL): where
    features() has "openmp", one parallel_rows call runs it on torch's OpenMP threads; else (or
    for a Python callable) Python threads do (ctypes drops the GIL during a call) - which compete
    with torch's threads while those spin after torch's own parallel regions."""
    global _pool
    threads = min(torch.get_num_threads(), n_rows)
    if threads <= 1 or fmas < PARALLEL_MIN_FMAS:
        return fn(0, n_rows, *args) or 0
    if isinstance(fn, ctypes._CFuncPtr) and SPLIT_ON_OPENMP and "openmp" in features():
        if len(args) > PARALLEL_ARGS:
            raise ValueError(f"parallel_rows passes {PARALLEL_ARGS} arguments after the rows, got {len(args)}")
        packed = (ctypes.c_int64 * PARALLEL_ARGS)(*(0 if a is None else int(a) for a in args))
        return _state["lib"].parallel_rows(threads, n_rows, ctypes.cast(fn, ctypes.c_void_p),
                                           int(fn.restype is not None), packed)
    if _pool is None or _pool._max_workers < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kernels-cpu")
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(fn, bounds[i], bounds[i + 1], *args) for i in range(1, threads)]
    err = fn(bounds[0], bounds[1], *args) or 0
    for f in futures:
        err |= f.result() or 0
    return err


def _pack_threads(x: torch.Tensor) -> int:
    """The threads a pack of x takes (its last argument): torch's count where the products split
    on OpenMP (features() has "openmp") and x has PARALLEL_MIN_PACK elements or more, else 1."""
    if x.numel() < PARALLEL_MIN_PACK or not (SPLIT_ON_OPENMP and "openmp" in features()):
        return 1
    return torch.get_num_threads()


def matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x W^T + bias: x [T, in] fp32 or bf16 (CPU, any strides), bias [out] or None (added in
    fp32) -> y [T, out] in ``out_dtype`` (default x's), fp32 sums whatever the dtypes of x and
    w. Needs ``lib()``; a BSR weight takes several tokens for 8 | b only (bsr_matmul)."""
    so = _state.get("lib") or lib()
    if so is None:
        raise RuntimeError(f"the native CPU library is unavailable: {error()}")
    T = x.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    fmas = w.values.numel() * T
    if T == 1 and (w.kind == "bsr" or x.dtype == out_dtype == w.values.dtype):
        # (the one-token kernels take x and give y in the weight's dtype; a CSR weight of
        # another mix takes the tiles below)
        x = x.to(w.values.dtype).contiguous()
        y = torch.empty(1, w.n_out, dtype=w.values.dtype)
        fn, lead = w.one_token(so)
        if w.widens:  # x widened once here, the rows then read the fp32 copy
            xf = torch.empty(w.n_in)
            so.bf16_to_f32(w.n_in, x.data_ptr(), xf.data_ptr())
            _split(w.n_rows, fmas, fn, *lead[2:], x.data_ptr(), xf.data_ptr(), 0, bias_ptr, y.data_ptr())
        else:
            _split(w.n_rows, fmas, fn, *lead[2:], x.data_ptr(), bias_ptr, y.data_ptr())
        return y.to(out_dtype)
    crow, cols, vals = w.crow.data_ptr(), w.cols.data_ptr(), w.values.data_ptr()
    if w.kind == "bsr16":
        return _bsr16_matmul(so, w, x, bias_ptr, out_dtype, fmas)
    if w.kind == "bsr":  # several tokens: blocks of 8 | b (their values [n][i][o], transposed)
        y = bsr_matmul(w.crow, w.cols, w.values, w.n_rows, w.n_in // w.block, x, bias, transpose=True,
                       out_dtype=out_dtype)
        if y is None:
            raise ValueError(f"a BSR native weight of b = {w.block} takes one token (several need 8 | b); "
                             "use the CSR one")
        return y
    width = w.n_in if w.panels == 1 else PANEL
    pairs = w.bf16_values
    if (x.dtype is torch.bfloat16 and pairs is not None and T >= DPBF16_MIN_TOKENS
            and width * 32 * 2 <= TILE_BYTES and "csr_dpbf16" in features()):
        return _csr_dpbf16_matmul(so, w, pairs, x, bias_ptr, out_dtype, fmas)
    # Tiles of tw tokens, token-minor ([tiles, in, tw]): each stored weight scales one
    # contiguous tw-wide row that stays in L2 (3072 x 32 x 4 B = 384 KB) for the whole tile.
    # The library packs x and writes y itself: torch's permute copies of these layouts cost
    # as much as the product (Linear 768 -> 3072 at 90%, T = 197: 2.6 of 6.1 ms).
    tw = _tile_width(T, width, (8, 16, 24, 32))
    xt = _pack(so, x, tw)
    y = torch.empty(T, w.n_out, dtype=out_dtype)
    fn = getattr(so, f"csr_mm_i{w.index}" + ("_bf16" if w.values.dtype == torch.bfloat16 else ""))
    y_bf16 = int(out_dtype is torch.bfloat16)
    acc = _rows_acc(w, tw)

    if _split(w.n_rows, fmas, fn, w.n_in, w.n_out, T, tw, w.panels, crow, cols, vals, xt.data_ptr(), bias_ptr,
              y.data_ptr(), w.n_out, y_bf16, acc):
        raise RuntimeError(f"csr_mm: no kernel for a tile of {tw} tokens")
    return y


def _csr_dpbf16_matmul(so, w: NativeWeight, pairs: torch.Tensor, x: torch.Tensor, bias_ptr, out_dtype: torch.dtype,
                       fmas: int) -> torch.Tensor:
    """bf16 x, several tokens, by AVX-512-BF16 on weight pairs (csr_mm_*_dpbf16, sparse_cpu.c): x
    packed into bf16 tiles of 32 tokens (pack_tokens_dpbf16), fp32 sums, y written by the kernel
    (64 rows' sums at a time)."""
    T = x.shape[0]
    xt = workspace("xt", (-(-T // 32), w.n_in, 32), torch.bfloat16)
    so.pack_tokens_dpbf16(T, w.n_in, x.data_ptr(), x.stride(0), x.stride(1), xt.data_ptr(), _pack_threads(x))
    y = torch.empty(T, w.n_out, dtype=out_dtype)
    fn = getattr(so, f"csr_mm_i{w.index}_dpbf16")
    ptrs = (w.crow.data_ptr(), w.cols.data_ptr(), pairs.data_ptr(), xt.data_ptr(), bias_ptr, y.data_ptr())
    y_bf16 = int(out_dtype is torch.bfloat16)
    acc = _rows_acc(w, 32)
    _split(w.n_rows, fmas, fn, w.n_in, w.n_out, T, w.panels, *ptrs, w.n_out, y_bf16, acc)
    return y


def _rows_acc(w: NativeWeight, tw: int) -> int | None:
    """The CSR products' sums of every row for one tile ([n_out, tw] fp32, a workspace) where the
    weight is in several panels (each panel then read by every row before the next), else None
    (64 rows at a time on the C stack)."""
    return workspace("yt", (w.n_out, tw), torch.float32).data_ptr() if w.panels > 1 else None


def _bsr16_matmul(so, w: NativeWeight, x: torch.Tensor, bias_ptr, out_dtype: torch.dtype, fmas: int) -> torch.Tensor:
    """Several tokens through AMX tiles (bsr16_mm_amx: x read in place as bf16 rows), or where the
    CPU has AVX-512-BF16 and no AMX by bsr16_mm_dpbf16 (x packed into token pairs)."""
    feats = features()
    if "amx" not in feats and "blocks_dpbf16" not in feats:
        raise RuntimeError(f"a bsr16 weight for several tokens needs AMX or AVX-512-BF16: {missing_feature('amx')}")
    T = x.shape[0]
    if x.dtype is not torch.bfloat16 or x.stride(1) != 1:
        x = x.to(torch.bfloat16).contiguous()
    y = torch.empty(T, w.n_out, dtype=out_dtype)
    y_bf16 = int(out_dtype is torch.bfloat16)
    if "amx" not in feats:
        xp = _pack_token_pairs16(so, x)
        ptrs = (w.crow.data_ptr(), w.cols.data_ptr(), w.values.data_ptr(), xp.data_ptr(), bias_ptr, y.data_ptr())
        _split(w.n_rows, fmas, so.bsr16_mm_dpbf16, 1, T, w.n_in, *ptrs, w.n_out, y_bf16)
        return y

    if _split(w.n_rows, fmas, so.bsr16_mm_amx, T, w.crow.data_ptr(), w.cols.data_ptr(), w.values.data_ptr(),
              x.data_ptr(), x.stride(0), bias_ptr, y.data_ptr(), w.n_out, y_bf16):
        raise RuntimeError("bsr16_mm_amx: the AMX tile state is not granted to this process")
    return y


def _pack(so: ctypes.CDLL, x: torch.Tensor, tw: int, slot: str = "xt") -> torch.Tensor:
    """x [T, n] fp32 or bf16 (any strides) -> fp32 token tiles [n_tiles, n, tw] (pack_tokens), in
    the workspace ``slot``."""
    T, n = x.shape
    xt = workspace(slot, (-(-T // tw), n, tw), torch.float32)
    pack = so.pack_tokens if x.dtype is torch.float32 else so.pack_tokens_bf16
    pack(T, n, x.data_ptr(), x.stride(0), x.stride(1), tw, xt.data_ptr(), _pack_threads(x))
    return xt


# The layers' CPU training path (forward, input gradient, weight gradient) funnels into two
# functions: kernels.sparse.csr_matmul (W @ dense_t for a CSR W: the forward and, with W^T's
# CSR, the input gradient of every format) and the element SDDMM of kernels.sddmm (the weight
# gradient at the stored elements). The two below compute the same with this library and
# return None where they do not apply, so a caller keeps torch's path then:
#     y = kernels.cpu.csr_matmul(crow, col, values, n_rows, n_cols, dense_t)
#     if y is None: ... torch's path ...


_FLOATS = (torch.float32, torch.bfloat16)


def _native_operands(*tensors: torch.Tensor) -> bool:
    """CPU tensors with real storage (not traced, not fake), and the library on."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:  # (a Parameter reaches a custom op as it is; fake / functional tensors must not)
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu":
            return False
    return lib() is not None


def csr_matmul(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int,
               dense_t: torch.Tensor) -> torch.Tensor | None:
    """W @ dense_t for W [n_rows, n_cols] in CSR (crow [n_rows + 1] and col [nnz] int32, as
    coords.csr_structure makes them: every column in [0, n_cols), unchecked here; values [nnz]
    fp32 or bf16) and dense_t [n_cols, T] fp32 or bf16 (any strides; typically x.t()) -> [n_rows,
    T] in dense_t's dtype, fp32 sums (the transpose of a contiguous [T, n_rows], so
    ``.t().contiguous()`` is free). None where the library does not apply (another dtype, int64
    indices, not on CPU, tracing, library off)."""
    if (values.dtype not in _FLOATS or dense_t.dtype not in _FLOATS or crow.dtype != torch.int32
            or col.dtype != torch.int32 or dense_t.dim() != 2 or dense_t.shape[0] != n_cols
            or crow.numel() != n_rows + 1 or col.numel() != values.numel() or dense_t.shape[1] == 0
            or not _native_operands(crow, col, values, dense_t)):
        return None
    w = NativeWeight("csr", n_rows, n_cols, crow.contiguous(), col.contiguous(), values.reshape(-1).contiguous())
    return matmul(w, dense_t.t(), None).t()


def sddmm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
    """g[i] = sum_t dy[t, rows[i]] * x[t, cols[i]]: dy [T, M] and x [T, N] fp32 or bf16, rows /
    cols [n] int32 in range (unchecked here) -> g [n] fp32 (fp32 sums). Both bf16 where
    features() has "sddmm_dpbf16": bf16 token tiles and AVX-512-BF16 dots (sddmm_rows_dpbf16 for
    coordinates stored row by row, else sddmm_tiles_dpbf16);
    else widened into fp32 token tiles (an fp32 operand is never rounded): sddmm_rows for
    coordinates stored row by row (rows never decreasing: each dy row is read into registers
    once per tile), else sddmm_tiles. None where the library does not apply (as csr_matmul)."""
    if (dy.dtype not in _FLOATS or x.dtype not in _FLOATS or rows.dtype != torch.int32
            or cols.dtype != torch.int32 or dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]
            or rows.shape != cols.shape or not _native_operands(dy, x, rows, cols)):
        return None
    so = _state["lib"]
    n, T = rows.numel(), dy.shape[0]
    g = torch.empty(n, dtype=torch.float32)
    if n == 0 or T == 0:
        return g.zero_()
    coords = (rows, cols)  # (the caller's tensors: what the pattern cache keys on)
    rows, cols = rows.reshape(-1).contiguous(), cols.reshape(-1).contiguous()
    if dy.dtype is x.dtype is torch.bfloat16 and "sddmm_dpbf16" in features():
        return _sddmm_dpbf16(so, dy, x, rows, cols, g, _row_pointers(coords[0], dy.shape[1]))
    # token tiles (pack_tokens): one tile of x stays in L2 while every weight reads its row,
    # and each weight's gradient is a dot of two contiguous rows per tile
    tw = _tile_width(T, x.shape[1], (16, 32))
    tiles = -(-T // tw)
    dyt, xt = _pack(so, dy, tw, "dyt"), _pack(so, x, tw)
    M, N = dy.shape[1], x.shape[1]
    crow = _row_pointers(coords[0], M)
    if crow is not None:  # stored row by row: each dy row read into registers once (sddmm_rows)
        ptrs = (crow.data_ptr(), cols.data_ptr(), dyt.data_ptr(), xt.data_ptr(), g.data_ptr())
        _split(M, n * T, so.sddmm_rows, tiles, tw, M, N, *ptrs)
        return g
    ptrs = (rows.data_ptr(), cols.data_ptr(), dyt.data_ptr(), xt.data_ptr(), g.data_ptr())
    _split(n, n * T, so.sddmm_tiles, tiles, tw, M, N, *ptrs)
    return g


def column_sums(t: torch.Tensor) -> torch.Tensor | None:
    """sum over the rows of a bf16 t [T, n] (columns contiguous) -> fp32 [n], fp32 sums in chunks
    of rows (col_sums_bf16 in sparse_cpu.c): a layer's bias gradient under autocast, which torch's
    ``sum(0, dtype=torch.float32)`` takes 25x as long for at 3072 columns as at 768 (6304 tokens,
    the EPYC Zen 4: 46 against 6.4 ms here). None for fp32 (torch's is as fast there) and where the
    library does not apply."""
    if (t.dim() != 2 or t.dtype is not torch.bfloat16 or t.stride(1) != 1 or t.shape[0] == 0
            or not _native_operands(t)):
        return None
    so = _state["lib"]
    T, n = t.shape
    out = torch.empty(n, dtype=torch.float32)
    _split(n, T * n, so.col_sums_bf16, T, t.data_ptr(), t.stride(0), out.data_ptr())
    return out


def _row_pointers(rows: torch.Tensor, M: int) -> torch.Tensor | None:
    """int32 [M + 1] row pointers of element coordinates whose rows never decrease (stored row
    by row, as fan-in layers and sorted coordinates are), else None; kept per pattern."""
    def build():
        r = rows.reshape(-1)
        if r.numel() > 1 and not bool((r[1:] >= r[:-1]).all()):
            return None
        return torch.searchsorted(r, torch.arange(M + 1, dtype=r.dtype)).to(torch.int32)
    return rt.cached_pattern((rows,), ("sddmm rows", M), build)


# Token tiles of the block product (bsr_mm in sparse_cpu.c): 8 tokens (8 outputs a register
# tile) up to 8 tokens, else 16 (4 outputs a register tile).
BSR_TILES = (8, 16)


def block_products(b: int) -> bool:
    """Whether b x b blocks have the library's block products (bsr_matmul, sddmm_blocks): b a
    multiple of 8 and the library loaded."""
    return b % 8 == 0 and b > 0 and lib() is not None


def bsr_matmul(crow: torch.Tensor, bcols: torch.Tensor, blocks: torch.Tensor, n_rows: int, n_cols: int,
               x: torch.Tensor, bias: torch.Tensor | None = None, bidx: torch.Tensor | None = None,
               transpose: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """y = x W^T + bias, W [n_rows * b, n_cols * b] a BSR of b x b blocks (b a multiple of 8):
    crow [n_rows + 1] and bcols [nnz] int32 over block rows / columns (coords.csr_structure's,
    unchecked here), blocks [n, b, b] fp32 or bf16 with blocks[n][o][i] = W[o, i] of the block at
    CSR position p being blocks[bidx[p]] (bidx int32 [nnz], or None for n = p) - or, with
    ``transpose``, blocks[n][i][o] (the CSR of W^T over the blocks of W: the input gradient).
    x [T, n_cols * b] fp32 or bf16, any strides -> y [T, n_rows * b] in ``out_dtype`` (default x's),
    fp32 sums (bf16 blocks and x widened, exactly; both bf16 with 16 | b where features() has
    "blocks_dpbf16": by AVX-512-BF16, _bsr_dpbf16). None where the library does not apply."""
    b = blocks.shape[-1] if blocks.dim() == 3 else 0
    if (b % 8 or b == 0 or blocks.shape[1] != b or blocks.dtype not in _FLOATS or x.dtype not in _FLOATS
            or crow.dtype != torch.int32 or bcols.dtype != torch.int32 or crow.numel() != n_rows + 1
            or x.dim() != 2 or x.shape[1] != n_cols * b
            or (bidx is not None and (bidx.dtype != torch.int32 or bidx.numel() != bcols.numel()))
            or not _native_operands(crow, bcols, blocks, x)):
        return None
    so = _state["lib"]
    T = x.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if T == 0:
        return torch.empty(0, n_rows * b, dtype=out_dtype)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    if blocks.dtype is x.dtype is torch.bfloat16 and b % 16 == 0 and "blocks_dpbf16" in features():
        return _bsr_dpbf16(so, crow, bcols, blocks, n_rows, n_cols, x, bias_ptr, bidx, transpose, out_dtype)
    blocks = blocks.detach().to(torch.float32).contiguous()
    so_, si = (1, b) if transpose else (b, 1)
    tw = BSR_TILES[0] if T <= BSR_TILES[0] else BSR_TILES[1]
    tiles = -(-T // tw)
    n_out = n_rows * b
    xt = _pack(so, x, tw)
    yt = workspace("yt", (tiles, n_out, tw), torch.float32)
    y = torch.empty(T, n_out, dtype=out_dtype)
    unpack = so.unpack_tokens if out_dtype is torch.float32 else so.unpack_tokens_bf16
    crow, bcols = crow.contiguous(), bcols.contiguous()
    bidx_ptr = None if bidx is None else bidx.contiguous().data_ptr()
    ptrs = (crow.data_ptr(), bcols.data_ptr(), bidx_ptr, blocks.data_ptr())

    fmas = bcols.numel() * b * b * T
    if _split(n_rows, fmas, so.bsr_mm, b, x.shape[1], n_out, tiles, tw, *ptrs, so_, si, xt.data_ptr(), bias_ptr,
              yt.data_ptr()):
        raise RuntimeError(f"bsr_mm: no kernel for b = {b}, a tile of {tw} tokens")
    _split(n_out, fmas, unpack, T, n_out, tw, yt.data_ptr(), y.data_ptr(), n_out)
    return y


def _pack_token_pairs16(so: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """bf16 x [T, n] (any strides, 16 | n) -> [tiles of 16 tokens, n / 2, 16, 2] bf16 (pack_token_pairs16)."""
    T, n = x.shape
    xp = workspace("xt", (-(-T // 16), n * 16), torch.bfloat16)
    so.pack_token_pairs16(T, n, x.data_ptr(), x.stride(0), x.stride(1), xp.data_ptr(), _pack_threads(x))
    return xp


def _bsr_dpbf16(so, crow, bcols, blocks, n_rows: int, n_cols: int, x: torch.Tensor, bias_ptr, bidx,
                transpose: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """bsr_matmul of bf16 blocks and x, 16 | b, by AVX-512-BF16 (bsr16_mm_dpbf16): the blocks cut
    into 16 x 16 VNNI sub-blocks in CSR order (pack_vnni16: W's, or W^T's for ``transpose``),
    x into token pairs (pack_token_pairs16); fp32 sums, y in ``out_dtype``."""
    b, T, nnz = blocks.shape[-1], x.shape[0], bcols.numel()
    q = b // 16
    blocks = blocks.detach().contiguous()
    crow, bcols = crow.contiguous(), bcols.contiguous()
    bidx_ptr = None if bidx is None else bidx.contiguous().data_ptr()
    vnni = workspace("vnni", (nnz * q * q, 256), torch.bfloat16)
    so_, si = (1, b) if transpose else (b, 1)  # W'[l, k] of the product's block at l * so_ + k * si
    _split(nnz, nnz * b * b, so.pack_vnni16, q, bidx_ptr, blocks.data_ptr(), so_, si, vnni.data_ptr())
    xp = _pack_token_pairs16(so, x)
    y = torch.empty(T, n_rows * b, dtype=out_dtype)
    ptrs = (crow.data_ptr(), bcols.data_ptr(), vnni.data_ptr(), xp.data_ptr(), bias_ptr, y.data_ptr())
    y_bf16 = int(out_dtype is torch.bfloat16)
    _split(n_rows * q, nnz * b * b * T, so.bsr16_mm_dpbf16, q, T, n_cols * b, *ptrs, n_rows * b, y_bf16)
    return y


def _pack_blocks(so: ctypes.CDLL, x: torch.Tensor, b: int, slot: str) -> torch.Tensor:
    """x [T, n] fp32 or bf16 (any strides) -> fp32 block columns [n / b, T, b] (pack_blocks), in
    the workspace ``slot``."""
    T, n = x.shape
    xp = workspace(slot, (n // b, T, b), torch.float32)
    pack = so.pack_blocks if x.dtype is torch.float32 else so.pack_blocks_bf16
    pack(T, n, x.data_ptr(), x.stride(0), x.stride(1), b, xp.data_ptr(), _pack_threads(x))
    return xp


def sddmm_blocks(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 b: int) -> torch.Tensor | None:
    """g[n] = dy[:, rows[n] b : +b]^T x[:, cols[n] b : +b] ([n, b, b] fp32, fp32 sums) for block
    coordinates rows / cols int32 [n] (in range, unchecked here), dy [T, M] and x [T, N] fp32 or
    bf16, b a multiple of 8 dividing M and N: by the fp32 register tiles of sddmm_blocks (bf16
    widened in its pack), or - both bf16, 16 | b - by AMX tiles where features() has "amx"
    (sddmm_blocks_amx), else by AVX-512-BF16 where it has "blocks_dpbf16" (sddmm_blocks_dpbf16).
    None where the library does not apply."""
    if (b % 8 or b == 0 or dy.dtype not in _FLOATS or x.dtype not in _FLOATS or rows.dtype != torch.int32
            or cols.dtype != torch.int32 or dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]
            or dy.shape[1] % b or x.shape[1] % b or rows.shape != cols.shape
            or not _native_operands(dy, x, rows, cols)):
        return None
    so = _state["lib"]
    n, T = rows.numel(), dy.shape[0]
    g = torch.empty(n, b, b, dtype=torch.float32)
    if n == 0:
        return g
    rows, cols = rows.reshape(-1).contiguous(), cols.reshape(-1).contiguous()
    if dy.dtype is x.dtype is torch.bfloat16 and b % 16 == 0 and T > 0:
        if "amx" in features():
            return _sddmm_blocks_amx(so, dy, x, rows, cols, b, g)
        if "blocks_dpbf16" in features():
            return _sddmm_blocks_dpbf16(so, dy, x, rows, cols, b, g)
    # both packed into fp32 block columns [n / b, T, b] (pack_blocks: bf16 widened), which every
    # block then reads as two contiguous streams
    dyp, xp = _pack_blocks(so, dy, b, "dyt"), _pack_blocks(so, x, b, "xt")
    ptrs = (rows.data_ptr(), cols.data_ptr(), dyp.data_ptr(), T * b, b, xp.data_ptr(), T * b, b, g.data_ptr())
    _split(n, n * b * b * T, so.sddmm_blocks, b, T, *ptrs)
    return g


def _sddmm_blocks_amx(so, dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int,
                      g: torch.Tensor) -> torch.Tensor:
    """bf16 dy and x, 16 | b, by AMX tiles (sddmm_blocks_amx): dy packed into bf16 token tiles of
    32 (pack_tokens_bf16_tiles: the A operand), x into token pairs (pack_token_pairs: B)."""
    T, M, N = dy.shape[0], dy.shape[1], x.shape[1]
    chunks = -(-T // 32)
    dyt = workspace("dyt", (chunks, M, 32), torch.bfloat16)
    so.pack_tokens_bf16_tiles(T, M, dy.data_ptr(), dy.stride(0), dy.stride(1), 32, dyt.data_ptr(), _pack_threads(dy))
    xv = workspace("xt", (chunks * 16, N, 2), torch.bfloat16)
    so.pack_token_pairs(T, N, x.data_ptr(), x.stride(0), x.stride(1), chunks * 16, xv.data_ptr(), _pack_threads(x))
    ptrs = (rows.data_ptr(), cols.data_ptr(), dyt.data_ptr(), xv.data_ptr(), g.data_ptr())

    if _split(rows.numel(), rows.numel() * b * b * T, so.sddmm_blocks_amx, b, chunks, M, N, *ptrs):
        raise RuntimeError("sddmm_blocks_amx: the AMX tile state is not granted to this process")
    return g


def _sddmm_blocks_dpbf16(so, dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int,
                         g: torch.Tensor) -> torch.Tensor:
    """bf16 dy and x, 16 | b, by AVX-512-BF16 (sddmm_blocks_dpbf16): both packed into groups of 16
    columns over token pairs (pack_pair_groups)."""
    T = dy.shape[0]
    pairs = -(-T // 2)

    def pack(t: torch.Tensor, slot: str) -> torch.Tensor:
        out = workspace(slot, (t.shape[1] // 16, pairs, 32), torch.bfloat16)
        so.pack_pair_groups(T, t.shape[1], t.data_ptr(), t.stride(0), t.stride(1), pairs, out.data_ptr(),
                            _pack_threads(t))
        return out
    dyg, xg = pack(dy, "dyt"), pack(x, "xt")
    ptrs = (rows.data_ptr(), cols.data_ptr(), dyg.data_ptr(), xg.data_ptr(), g.data_ptr())
    _split(rows.numel(), rows.numel() * b * b * T, so.sddmm_blocks_dpbf16, b, pairs, *ptrs)
    return g


def _sddmm_dpbf16(so, dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  g: torch.Tensor, crow: torch.Tensor | None) -> torch.Tensor:
    """bf16 dy and x by AVX-512-BF16: both packed into bf16 token tiles in token order
    (pack_tokens_bf16_tiles, 32 / 64 / 128 tokens: a tile of x within TILE_BYTES at 2 B an
    element), a pair of tokens per fp32 lane; coordinates stored row by row (``crow``, their row
    pointers) by sddmm_rows_dpbf16 (each dy row in registers for its row), else sddmm_tiles_dpbf16."""
    T, n = dy.shape[0], rows.numel()
    tw = _tile_width(T, x.shape[1], (32, 64, 128), elem_bytes=2)
    tiles = -(-T // tw)

    def pack(t: torch.Tensor, slot: str) -> torch.Tensor:
        out = workspace(slot, (tiles, t.shape[1], tw), torch.bfloat16)
        so.pack_tokens_bf16_tiles(T, t.shape[1], t.data_ptr(), t.stride(0), t.stride(1), tw, out.data_ptr(),
                                  _pack_threads(t))
        return out
    dyt, xt = pack(dy, "dyt"), pack(x, "xt")
    M, N = dy.shape[1], x.shape[1]
    if crow is not None:
        ptrs = (crow.data_ptr(), cols.data_ptr(), dyt.data_ptr(), xt.data_ptr(), g.data_ptr())
        _split(M, n * T, so.sddmm_rows_dpbf16, tiles, tw, M, N, *ptrs)
        return g
    ptrs = (rows.data_ptr(), cols.data_ptr(), dyt.data_ptr(), xt.data_ptr(), g.data_ptr())
    _split(n, n * T, so.sddmm_tiles_dpbf16, tiles, tw, M, N, *ptrs)
    return g
