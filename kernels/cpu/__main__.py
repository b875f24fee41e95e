"""``python -m kernels.cpu``: build the native CPU library now (.ci/setup runs it); prints its
path, or why it could not be built (exit 0 either way: the layers then use torch's path)."""
import sys

from . import build, variant

try:
    print(f"kernels.cpu: built {build()} ({variant()[0]})")
except RuntimeError as e:
    print(f"kernels.cpu: not built, the layers will use torch's CPU path: {e}", file=sys.stderr)
sys.exit(0)
