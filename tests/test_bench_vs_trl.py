"""benchmarks/bench_vs_trl.py: argument checks, and one tiny side-by-side run of both tools."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_vs_trl.py"


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_unknown_tool_is_named_with_the_choices():
    out = bench("--tools", "sdft-lite,axolotl")
    assert out.returncode == 2
    assert "unknown axolotl" in out.stderr
    assert "sdft-lite, sdft-lite-unsloth, trl" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without CUDA")
def test_unsloth_tool_without_a_gpu_says_what_is_missing():
    out = bench("--tools", "sdft-lite,sdft-lite-unsloth")
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr
    assert "leave it out of --tools" in out.stderr


@pytest.mark.slow
def test_tiny_side_by_side_run_writes_one_row_per_tool(tmp_path):
    out_file = tmp_path / "bench.json"
    args = ["--vocab", "4096", "--completion", "8", "--steps", "1", "--warmup", "1", "--repeats", "1"]
    out = bench(*args, "--losses", "full", "--profile-tools", "", "--out", str(out_file))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    written = json.loads(out_file.read_text())
    rows = {r["tool"]: r for r in written["results"]}
    # the floors use each rate's better measurement, before or after the runs
    meta = written["meta"]
    assert meta["matmul"]["matmul_flops"] == max(
        meta["matmul_before"]["matmul_flops"], meta["matmul_after"]["matmul_flops"]
    )
    for key in ("decode_head_flops", "head_read_bytes"):
        assert meta["matmul"][key]["4096"] == max(
            meta["matmul_before"][key]["4096"], meta["matmul_after"][key]["4096"]
        )
    assert set(rows) == {"sdft-lite", "trl"}
    ours, trl = rows["sdft-lite"], rows["trl"]
    for r in (ours, trl):
        assert r["config"] == "full V=4096 T=8"
        assert r["mean_completion_length"] == 8  # both tools generate exactly --completion tokens
        assert r["seconds_per_step"] > 0 and r["tokens_per_second"] > 0
        assert r["peak_rss_mib"] >= r["rss_before_train_mib"] > 0
        assert r["floor_seconds"] > 0
        # the memory-bound floors only ever price the rollout's head higher than its FLOPs do
        assert r["roofline_floor_seconds"] >= r["floor_seconds"]
        assert r["decode_bound_floor_seconds"] >= r["floor_seconds"]
        for key in ("floor", "roofline_floor", "decode_bound_floor"):
            ratio = r["time_over_floor" if key == "floor" else f"time_over_{key}"]
            assert ratio == pytest.approx(r["seconds_per_step"] / r[f"{key}_seconds"])
        flops = r["floor_flops"]
        assert flops["total"] == pytest.approx(flops["rollout"] + flops["teacher"] + flops["student"])
        # frozen weights: the student's backward is one product for them, two for LoRA/attention
        assert 2 * flops["rollout"] < flops["student"] < 3 * flops["rollout"]
    assert ours["step_ratio"] == pytest.approx(ours["seconds_per_step"] / trl["seconds_per_step"])
    assert ours["rss_ratio"] == pytest.approx(ours["peak_rss_mib"] / trl["peak_rss_mib"])
    assert "s/step vs TRL" in out.stdout and "sdft-lite" in out.stdout
