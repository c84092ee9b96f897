import sys
from pathlib import Path

# Benchmarks compare against the official-style reference that lives beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
