"""``python -m kernels.cpu``: build the native CPU library now (.ci/setup runs it); prints its
path, or why it could not be built (exit 0 either way: the layers then use torch's path).
``python -m kernels.cpu --probe-amx``: the AMX kernels' first-run check (kernels.cpu._amx_probe
runs it in a child process): exit 0 where they are right on this CPU, else 1 with what is wrong.
``python -m kernels.cpu --amx-steps``: this CPU's build's AMX instructions one step at a time
(kernels.cpu.amx_steps), each in a child process: exit 0 where every step is right, else 1."""
import sys

from . import _probe_amx_run, amx_steps, build, error, features, lib, loaded_variant, variant

if sys.argv[1:] == ["--probe-amx"]:
    wrong = _probe_amx_run()
    if wrong:
        print(wrong, file=sys.stderr)
    sys.exit(1 if wrong else 0)
if sys.argv[1:] == ["--amx-steps"]:
    path = build()
    steps = amx_steps(path)
    print(f"kernels.cpu: the AMX instructions step by step ({variant()[0]} build, {path.name}):")
    for name, how in steps:
        print(f"  {name}: {how}")
    sys.exit(0 if all(how == "ok" for _, how in steps) else 1)
so = lib()
if so is not None:
    print(f"kernels.cpu: built {so._name} ({loaded_variant()}; optional kernels: {', '.join(sorted(features())) or 'none'})")
else:
    print(f"kernels.cpu: not built, the layers will use torch's CPU path: {error()}", file=sys.stderr)
sys.exit(0)
