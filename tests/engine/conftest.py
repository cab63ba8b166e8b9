import sys
from pathlib import Path

# engine_toys.py / engine_driver.py live next to the tests (pytest runs with --import-mode=importlib)
sys.path.insert(0, str(Path(__file__).resolve().parent))
