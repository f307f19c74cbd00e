"""scripts/demo.py's terminal sparkline (the PNG is drawn by matplotlib, which
the demo installs; run the demo to see it)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import demo  # noqa: E402


def test_sparkline_scales_lowest_to_highest():
    assert demo.sparkline([100, 900, 900, 500, 100]) == "▁██▅▁"
    assert demo.sparkline([]) == ""
    assert demo.sparkline([5, 5, 5]) == "▁▁▁"


def test_sparkline_keeps_peaks_when_squeezed():
    values = [100] * 100
    values[37] = 900                        # one sample, squeezed 10:1
    line = demo.sparkline(values, width=10)
    assert len(line) == 10 and line == "▁▁▁█▁▁▁▁▁▁"
    assert len(demo.sparkline(list(range(61)), width=60)) == 60
