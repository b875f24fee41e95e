# kernels must be imported before triton: without a GPU it switches the Triton interpreter on,
# which only takes effect for code that triton defines after the switch (its own tl.zeros too).
import kernels  # noqa: F401
