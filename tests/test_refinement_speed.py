"""benchmarks/refinement_speed.py times every refinement the trainers build, forward and backward, at toy size."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_refinement_is_timed_without_errors(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "refinement_speed.py"), "--device", "cpu",
                           "--shape", "8", "24", "24", "--threads", "1", "--repeats", "1", "--offset-modes", "loop",
                           "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} >= {"DRAMTrainer", "DRAMTrainerWithAttention", "DRAMTrainerWithCRF"}
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    assert all(r["forward_backward_s"] > 0 for r in rows)
