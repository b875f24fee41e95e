"""models package."""

# This project's kernels are `alwayssparse.kernels` (kernels/_names.py: why two names); in a
# checkout that is not installed, its top-level `kernels` provides that name.
try:
    import alwayssparse.kernels  # noqa: F401
except ModuleNotFoundError:
    import kernels  # noqa: F401
