"""bench/gpu.py runs end to end on the CPU at its smoke size and writes every number it promises."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["status"] == "complete" and _positive(d["elapsed_s"])
    for key in ("device_name", "torch", "timm", "kornia"):
        assert d["meta"][key], key

    # part 1: every size, eager and OpenCV measured; the compiled detector is skipped at the smoke size, with a reason
    assert [r["size"] for r in d["sift"]] == d["meta"]["args"]["sizes"]
    for r in d["sift"]:
        for key in ("eager_img_s", "opencv_img_s", "eager_vs_opencv", "keypoints_per_image"):
            assert _positive(r[key]), (r["size"], key, r[key])
        assert r["compiled_img_s"] is None and "--no-compile" in r["compiled_skipped"]
        assert r["graph_img_s"] is None and "CUDA" in r["graph_skipped"]  # recorded graphs need a GPU

    # part 2: baseline, on-the-fly and cached guided steps, with ratios to the baseline
    s = d["steps"]
    assert _positive(s["cache_build_s"]) and s["pool_images"] > 0
    assert set(s["variants"]) == {"baseline", "guided", "guided+graph", "guided+prefetch", "guided+cache",
                                  "guided+folder"}
    for name, v in s["variants"].items():
        for key in ("step_ms", "img_s", "throughput_ratio", "saved_for_backward_mib", "saved_ratio"):
            assert _positive(v[key]), (name, key, v[key])
        assert len(v["steps_ms"]) == s["timed_steps"] and all(_positive(t) for t in v["steps_ms"])
    assert s["variants"]["baseline"]["throughput_ratio"] == 1.0
    assert s["compiled"] is None and "--no-compile" in s["compile_skipped"]
    # part 3: the folder cache's build rate and size
    f = d["folder_cache"]
    for key in ("build_img_s", "bytes_per_image", "gb_per_million", "hours_per_million"):
        assert _positive(f[key]), (key, f[key])
    assert f["bytes_per_image"] >= 512 * 4 * 2  # 512 fp16 (x, y, scale, response) rows per image
    # the targets read back from this run's numbers
    t = d["targets"]
    assert t["detector_target"] == 30000 and t["on_the_fly_ratio"] == max(
        s["variants"][k]["throughput_ratio"] for k in ("guided+graph", "guided+prefetch"))
    assert t["folder_cache_ratio"] == s["variants"]["guided+folder"]["throughput_ratio"]
    # the printed table carries the same numbers
    assert "guided+cache" in proc.stdout and "guided+prefetch" in proc.stdout and "OpenCV" in proc.stdout
