"""`sdft-lite doctor`: what this machine can run, and the command that fixes what is missing.

Each check is a row (check, value, status). status is "ok", or "warn: <what to do>" (works, but
slower or without a feature), or "missing: <command>" (a training run would fail). Package
versions come from installed metadata, so nothing heavy is imported, and unsloth never is
(importing it patches transformers for the rest of the process).
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import platform
import sys

Row = tuple[str, str, str]
OK = "ok"
# Needed for training (installed with sdft-lite), then optional extras with how to get them.
REQUIRED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")
OPTIONAL = {
    "unsloth": ('pip install "sdft-lite[unsloth]"', "faster LoRA kernels on NVIDIA GPUs (backend unsloth)"),
    "gradio": ("pip install gradio", "the web app"),
}
PYTHON_RANGE = ((3, 10), (3, 13))


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _pinned_ranges() -> dict[str, str]:
    """Version ranges sdft-lite declares for its dependencies, e.g. {'torch': '<2.15,>=2.13'}."""
    try:
        from packaging.requirements import Requirement

        reqs = [Requirement(r) for r in md.requires("sdft-lite") or []]
    except (md.PackageNotFoundError, ImportError, ValueError):
        return {}
    return {r.name.lower(): str(r.specifier) for r in reqs if r.marker is None}


def _in_range(version: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(spec).contains(version, prereleases=True)
    except Exception:  # an unparsable local version: do not cry wolf
        return True


def python_row() -> Row:
    v = sys.version_info
    ok = PYTHON_RANGE[0] <= (v.major, v.minor) <= PYTHON_RANGE[1]
    lo, hi = (".".join(map(str, x)) for x in PYTHON_RANGE)
    return "python", platform.python_version(), OK if ok else f"missing: use Python {lo} to {hi}"


def package_rows(cuda: bool = False) -> list[Row]:
    ranges = _pinned_ranges()
    rows = []
    for dist in REQUIRED:
        version = _version(dist)
        if version is None:
            rows.append((dist, "not installed", "missing: pip install sdft-lite"))
        elif dist in ranges and not _in_range(version, ranges[dist]):
            rows.append(
                (
                    dist,
                    version,
                    f'warn: sdft-lite is tested with {dist}{ranges[dist]}: pip install "{dist}{ranges[dist]}"',
                )
            )
        else:
            rows.append((dist, version, OK))
    for dist, (fix, what) in OPTIONAL.items():
        version = _version(dist)
        if version is None and dist == "unsloth" and not cuda:
            rows.append((dist, "not installed (only used on NVIDIA GPUs)", OK))
        else:
            rows.append(
                (dist, version or "not installed", OK if version else f"warn: optional, for {what}: {fix}")
            )
    return rows


def gpu_rows() -> list[Row]:
    """CUDA availability, and each visible GPU's name and total memory."""
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'no'}"
        return [
            (
                "cuda",
                f"not available ({build})",
                "warn: training runs on the CPU (slow). On an NVIDIA machine install a CUDA build of torch: "
                "https://pytorch.org/get-started/locally/",
            )
        ]
    rows = [("cuda", f"available (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU)", OK)]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append(
            (f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}", OK)
        )
    return rows


def dtype_row(capability: tuple[int, int] | None) -> Row:
    """What `model.dtype: auto` loads here: float32 on a CPU; on a GPU, `models.choose_dtype`'s
    rule for its compute capability (bfloat16 from 8.0, float16 below it, e.g. on a T4)."""
    from .models import choose_dtype

    if capability is None:
        return "dtype auto", "float32 (CPU)", OK
    name = choose_dtype("auto", "cuda", capability)
    why = "native bfloat16" if name == "bfloat16" else "no native bfloat16 below 8.0"
    return "dtype auto", f"{name} (gpu 0: compute {capability[0]}.{capability[1]}, {why})", OK


def bnb_4bit_row() -> Row:
    """Quantize a Linear(64, 64) to NF4 with bitsandbytes and run a forward on this machine's device."""
    try:
        import torch

        bnb_log = logging.getLogger("bitsandbytes")
        level = bnb_log.level
        bnb_log.setLevel(logging.ERROR)  # its notice about optional CPU kernels is noise here
        try:
            import bitsandbytes as bnb
        finally:
            bnb_log.setLevel(level)

        device = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        ref = torch.nn.Linear(64, 64)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(64, 64, generator=g) / 8)
            ref.bias.copy_(torch.randn(64, generator=g) / 8)
        q = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(ref.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q.bias = torch.nn.Parameter(ref.bias.data.clone(), requires_grad=False)
        q, ref = q.to(device), ref.to(device)  # moving Params4bit to a device quantizes it
        x = torch.randn(4, 64, generator=g).to(device)
        with torch.no_grad():
            err = ((q(x) - ref(x)).norm() / ref(x).norm()).item()
        if not q.weight.dtype == torch.uint8 or not err < 0.25:  # NF4 error on random weights is ~0.1
            return (
                "bitsandbytes 4-bit",
                f"wrong result on {device} (relative error {err:.2f})",
                (
                    "warn: set model.load_in_4bit: false, or reinstall bitsandbytes: pip install -U 'bitsandbytes>=0.50,<0.51'"
                ),
            )
        return "bitsandbytes 4-bit", f"works on {device} (NF4 relative error {err:.2f})", OK
    except Exception as e:
        return (
            "bitsandbytes 4-bit",
            f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
            (
                "warn: set model.load_in_4bit: false, or reinstall bitsandbytes: pip install -U 'bitsandbytes>=0.50,<0.51'"
            ),
        )


def backend_row() -> Row:
    from .backends import INSTALL_UNSLOTH, choose_backend, cuda_available, unsloth_installed

    cuda, unsloth = cuda_available(), unsloth_installed()
    backend, reason = choose_backend("auto", cuda, unsloth)
    status = OK
    if cuda and not unsloth:
        status = f"warn: Unsloth trains faster with less memory on this GPU: {INSTALL_UNSLOTH}"
    return "backend auto", f"{backend} ({reason.removeprefix('auto: ')})", status


def kernels_row() -> Row:
    """Which vector path the CPU kernels took, and whether the loss runs on AMX bf16 tiles."""
    from . import kernels

    path = kernels.simd()
    if path is None:
        return (
            "cpu kernels",
            "not built (no C compiler found, or SDFT_LITE_KERNELS=0)",
            "warn: the CPU sampler and loss run as PyTorch ops (slower): install gcc or clang (or set CC)",
        )
    amx = "yes" if kernels.amx_bf16() else "no (fp32 tiles)"
    return "cpu kernels", f"{path}; loss on AMX bf16 tiles: {amx}", OK


def run_doctor() -> list[Row]:
    """All checks, in the order `format_doctor` prints them."""
    rows = [python_row()]
    try:
        import torch
    except ImportError:
        return rows + [("torch", "not installed", "missing: pip install sdft-lite")]
    gpu = gpu_rows()
    rows += gpu + package_rows(cuda=gpu[0][2] == OK)
    cuda = torch.cuda.is_available()
    rows.append(dtype_row(tuple(torch.cuda.get_device_capability(0)) if cuda else None))
    rows.append(bnb_4bit_row())
    rows.append(kernels_row())
    rows.append(backend_row())
    return rows


def format_doctor(rows: list[Row]) -> str:
    """A table, then the list of fixes (or a line saying everything needed is there)."""
    w1 = max(len(r[0]) for r in rows)
    w2 = min(60, max(len(r[1]) for r in rows))
    lines = [f"{c:<{w1}}  {v:<{w2}}  {s.split(':', 1)[0]}" for c, v, s in rows]
    fixes = [(c, s.split(":", 1)) for c, _, s in rows if s != OK]
    missing = [f"  {c}: {fix.strip()}" for c, (level, fix) in fixes if level == "missing"]
    warn = [f"  {c}: {fix.strip()}" for c, (level, fix) in fixes if level == "warn"]
    if missing:
        lines += ["", "missing (training will fail until fixed):", *missing]
    if warn:
        lines += ["", "suggestions:", *warn]
    if not missing:
        lines += ["", "everything sdft-lite needs to train is here."]
    return "\n".join(lines)
