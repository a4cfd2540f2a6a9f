"""`python -m accordion.native`: build the native ops ahead (make setup does)."""

import sys

from accordion.native import available, library_path

print(library_path() if available() else "native ops unavailable", file=sys.stderr)
