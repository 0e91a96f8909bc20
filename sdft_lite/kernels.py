"""C kernels for the CPU path, compiled on first use by the machine's own C compiler.

One source, `csrc/cpu_kernels.c`, these kernels:
- `sdft_int8_probs`: the int8 proposal's probabilities (`sampling.Int8Proposal`) in one pass over
  the int8 head copy (packed in groups of 16 ids, `sampling.pack_int8_rows`): int16 x int8 dot
  products with exact int32 sums (AMX int8 tiles where the CPU has them and Linux grants them,
  each int16 split into two bytes; else AVX-512 VNNI `vpdpwssd`, AVX-512BW or AVX2 `vpmaddwd`,
  or scalar C), the fp32 outlier columns, exp and the block masses of the two-level sampler, on
  a thread per core; then `sdft_int8_draw` (one thread) draws from them and runs the acceptance test;
- `sdft_decode_step`: one decode step of a small Llama-family decoder with plain fp32 weights
  (`decode.CStep`), on one thread;
- `sdft_softmax_tile`: one vocabulary tile of the distillation loss's online softmax
  (`tiled_loss`): row maxima, exp, sums and the rescale of earlier sums in one pass over the tile,
  on a thread per core;
- `sdft_kl_amx`: where the CPU has AMX bf16 tiles, the loss's whole pass over a head shared by
  teacher and student (`tiled_loss`, forward KL, full vocabulary or the student's top-k): logits,
  online softmax, the top-k's candidates and the gradient's sums in one call, its products as
  bf16x3, on a thread per core.
Where no compiler is found or `SDFT_LITE_KERNELS=0`, all run as PyTorch ops instead (slower; the
same distribution, the same loss and hidden states up to fp32 rounding).

`simd()` names the vector path a build took. Built with `$CC` (default `cc`) as
`-O3 -march=native`, into `$SDFT_LITE_CACHE/kernels` (default `~/.cache/sdft-lite/kernels`), one
file per source, compiler and CPU: a cache shared by machines with other CPUs never loads code
built for another one. A build writes to a temporary name and
renames, so concurrent processes never load a half-written library. Before a new build is kept,
its exp is checked against float64 exp on every fp32 input of three binades (`EXP_CHECK_RANGES`);
the proposal's error bound counts on `EXP_MAX_REL_ERROR`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
# The kernel's exp: the largest relative error it may have against the true exp (measured over
# every fp32 input in [-87.3, 88.7] on the AMD EPYC dev machine: 1.19e-7, ~1 ulp). Its results
# are +inf from ~88.376 (fp32's exp overflows at 88.72): the check skips infinite results (see
# exp_scalar in cpu_kernels.c for why no caller is harmed).
EXP_MAX_REL_ERROR = 2.5e-7
# Checked on every new build (every fp32 in each range, ~25M inputs, ~0.3 s): arguments below 1
# in size, the largest arguments, and the most negative ones before fp32's normal range ends.
EXP_CHECK_RANGES = ((-1.0, -0.5), (0.5, 1.0), (64.0, 88.7), (-87.3, -64.0))
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
BUILD_TIMEOUT_S = 120

_LIBRARY: list = []  # [ctypes.CDLL or None] once looked up in this process
_P, _I64 = ctypes.c_void_p, ctypes.c_int64


def enabled() -> bool:
    return os.environ.get("SDFT_LITE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("SDFT_LITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdft-lite"
    )
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags where Linux says them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [
        line
        for line in info.splitlines()
        if line.split(":")[0].strip() in ("model name", "flags", "Features")
    ]
    return "\n".join(sorted(set(wanted))) or platform.machine()


def _compiler() -> tuple[str, str] | None:
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return cc, version.splitlines()[0] if version else ""


class DecodeLayer(ctypes.Structure):
    """`decode_layer_t` of cpu_kernels.c: one layer's arguments to `sdft_decode_step`."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "norm_in",
            "w_qkv",
            "b_qkv",
            "w_o",
            "b_o",
            "norm_post",
            "w_gate_up",
            "b_gate_up",
            "w_down",
            "b_down",
            "keys_t",
            "values",
        )  # fmt: skip
    ] + [("eps_in", ctypes.c_float), ("eps_post", ctypes.c_float)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    _F = ctypes.c_float
    lib.sdft_decode_scratch.restype = _I64
    lib.sdft_decode_scratch.argtypes = [_I64] * 7
    lib.sdft_decode_step.restype = ctypes.c_int
    lib.sdft_decode_step.argtypes = (
        [_P, _I64, _P, _I64, _P] + [_I64] * 6 + [_F, _P, _P, _P, _I64, _I64, _P, _F, _P, _I64, _P]
    )
    lib.sdft_int8_probs.restype = ctypes.c_int
    lib.sdft_int8_probs.argtypes = [_P] * 8 + [_I64] * 6 + [ctypes.c_float, ctypes.c_int]
    lib.sdft_int8_inputs.restype = ctypes.c_int
    lib.sdft_int8_inputs.argtypes = [_P] * 4 + [_I64] * 5 + [ctypes.c_double] + [_P] * 4
    lib.sdft_int8_draw.restype = _I64
    lib.sdft_int8_draw.argtypes = [_P] * 6 + [_I64] * 5 + [ctypes.c_double, ctypes.c_float, _P]
    lib.sdft_above.restype = _I64
    lib.sdft_above.argtypes = [_P] + [_I64] * 3 + [_P] + [_I64] * 2 + [_P] * 3 + [_I64] + [_P] * 2
    lib.sdft_softmax_tile.restype = _I64
    lib.sdft_softmax_tile.argtypes = [_P] * 5 + [_I64] * 2 + [ctypes.c_int]
    lib.sdft_exp_max_error.restype = ctypes.c_double
    lib.sdft_kl_amx.restype = _I64
    lib.sdft_kl_amx.argtypes = [_P] * 8 + [_I64] * 5 + [ctypes.c_int]
    lib.sdft_kl_amx_bytes.restype = _I64
    lib.sdft_kl_amx_bytes.argtypes = [_I64] * 4 + [ctypes.c_int]
    lib.sdft_exp_max_error.argtypes = [ctypes.c_float, ctypes.c_float]
    lib.sdft_simd.restype = ctypes.c_int
    lib.sdft_simd.argtypes = []
    lib.sdft_int8_layout.restype = ctypes.c_int
    lib.sdft_int8_layout.argtypes = []
    return lib


def _build(cc: str, target: Path, extra_flags: tuple[str, ...] = ()) -> Path | None:
    """Compiles SOURCE into `target` (`extra_flags` after FLAGS: tests build the other vector
    paths with e.g. -mno-avx512f); None where it does not build or its exp fails the check."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    native = [*FLAGS, *extra_flags]
    for flags in (native, [f for f in native if f != "-march=native"]):  # a compiler without -march=native
        cmd = [cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            log.info("sdft-lite kernels: %s failed: %s", " ".join(cmd), e)
            continue
        if done.returncode == 0:
            break
        log.info("sdft-lite kernels: %s failed:\n%s", " ".join(cmd), done.stderr[-2000:])
    else:
        os.unlink(tmp)
        return None
    try:
        worst = max(_bind(ctypes.CDLL(tmp)).sdft_exp_max_error(lo, hi) for lo, hi in EXP_CHECK_RANGES)
    except OSError as e:
        log.info("sdft-lite kernels: the built library does not load: %s", e)
        os.unlink(tmp)
        return None
    if not worst <= EXP_MAX_REL_ERROR:
        log.warning(
            "sdft-lite kernels: exp error %.3g over %.3g with this compiler; not used",
            worst,
            EXP_MAX_REL_ERROR,
        )
        os.unlink(tmp)
        return None
    os.replace(tmp, target)
    return target


SIMD_PATHS = {
    4: "AMX int8 + AVX-512",
    3: "AVX-512 VNNI",
    2: "AVX-512BW",
    11: "AVX2 + AVX-VNNI",
    1: "AVX2",
    0: "scalar C",
}


_AMX_BF16: dict[int, bool] = {}  # id(library) -> whether its sdft_kl_amx runs in this process


def amx_bf16() -> bool:
    """Whether the loss's pass runs on AMX bf16 tiles here (`sdft_kl_amx`; `tiled_loss`): the build
    has them and Linux grants this process the tiles. Asked once per library."""
    lib = library()
    if lib is None:
        return False
    if id(lib) not in _AMX_BF16:
        x, w = (ctypes.c_float * 64)(), (ctypes.c_float * 128)()
        m, z = (ctypes.c_float * 2)(), (ctypes.c_float * 2)()
        _AMX_BF16[id(lib)] = lib.sdft_kl_amx(x, w, m, z, None, None, None, None, 1, 1, 32, 4, 0, 1) != -2
    return _AMX_BF16[id(lib)]


def simd() -> str | None:
    """The vector path of this machine's build (`SIMD_PATHS`), or None where no library builds."""
    lib = library()
    return None if lib is None else SIMD_PATHS.get(lib.sdft_simd(), "unknown")


def library() -> ctypes.CDLL | None:
    """The compiled `cpu_kernels.c`, built once per source, compiler and CPU; None where it cannot
    be (no compiler, a failed build, `SDFT_LITE_KERNELS=0`), with the reason logged at INFO."""
    if _LIBRARY:
        return _LIBRARY[0]
    lib = None
    if not enabled():
        log.info("sdft-lite kernels: off (SDFT_LITE_KERNELS=0)")
    elif (found := _compiler()) is None:
        log.info("sdft-lite kernels: no C compiler (set CC); PyTorch ops instead")
    else:
        cc, version = found
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_id()]).encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"cpu_kernels-{key}.so"
        try:
            path = target if target.exists() else _build(cc, target)
            lib = _bind(ctypes.CDLL(str(path))) if path is not None else None
        except OSError as e:  # an unwritable cache, a library that does not load
            log.info("sdft-lite kernels: %s", e)
            lib = None
    _LIBRARY.append(lib)
    return lib
