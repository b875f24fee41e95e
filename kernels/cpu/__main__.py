"""``python -m kernels.cpu``: build the native CPU library now (.ci/setup runs it); prints its
path, or why it could not be built (exit 0 either way: the layers then use torch's path)."""
import sys

from . import error, features, lib, loaded_variant

so = lib()
if so is not None:
    print(f"kernels.cpu: built {so._name} ({loaded_variant()}; optional kernels: {', '.join(sorted(features())) or 'none'})")
else:
    print(f"kernels.cpu: not built, the layers will use torch's CPU path: {error()}", file=sys.stderr)
sys.exit(0)
