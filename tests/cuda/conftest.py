import sys
from pathlib import Path

# cuda_support.py lives next to the tests (pytest runs with --import-mode=importlib)
sys.path.insert(0, str(Path(__file__).resolve().parent))
