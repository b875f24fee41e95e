"""The two names of this package, and the hub client that owns the top-level one elsewhere.

Installed, these kernels are ``alwayssparse.kernels``: a name nothing else uses. In a checkout's
root the project's fixed layout also makes them the top-level ``kernels``, a name that everywhere
else belongs to Hugging Face's hub client (the PyPI distribution ``kernels``, which transformers
>= 5.25 requires and imports while it loads a model). So, from :func:`bind`:

- Whichever of the two names is imported first is the package, and the other one, where it
  would load these same files, becomes an alias of it and of every submodule
  (``kernels.fanin is alwayssparse.kernels.fanin``): one copy of each module in a process, so the
  torch.library ops are registered once. In a checkout that is not installed, importing
  ``kernels`` provides ``alwayssparse.kernels`` too.
- Where these kernels are the top-level ``kernels`` (a checkout's root), they serve the hub
  client's API as well: its folder joins this package's ``__path__`` (the two packages share no
  module name: ours are listed by :data:`HERE`, its are ``_internals``, ``_rust``,
  ``benchmark``) and its public names (``kernels.get_kernel``, ``kernels.Mode``, ...) come from
  its own ``__init__``, run on first use. Outside a checkout ``kernels`` is the hub client alone.
"""
import importlib.abc
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

INSTALLED = "alwayssparse.kernels"
LAYOUT = "kernels"
HUB_DISTRIBUTION = "kernels"   # Hugging Face's hub client, on PyPI
HERE = Path(__file__).resolve().parent


def _loads_these_files(name: str) -> bool:
    """Would ``import name`` load this folder's package (without importing it)?"""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):   # a missing parent; a module whose __spec__ is None
        return False
    return bool(spec and spec.submodule_search_locations) and any(
        Path(p).resolve() == HERE for p in spec.submodule_search_locations)


def _is_ours(submodule: str) -> bool:
    """Is ``.diag.kernel`` (a dotted tail) one of this package's modules, not the hub client's?"""
    first = submodule.lstrip(".").split(".")[0]
    return (HERE / first).is_dir() or (HERE / f"{first}.py").is_file()


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import alias[.sub]`` returns the module ``target[.sub]`` (imported if it is not yet):
    one module object under two names. Only this package's own submodules are aliased; with
    ``make_parent`` the alias's missing parent package (``alwayssparse``) is made empty."""

    def __init__(self, alias: str, target: str, make_parent: bool):
        self.alias, self.target = alias, target
        self.parent = alias.rpartition(".")[0] if make_parent else ""

    def find_spec(self, name, path=None, target=None):
        if self.parent and name == self.parent:
            return importlib.util.spec_from_loader(name, self, is_package=True)
        if name == self.alias or (name.startswith(self.alias + ".") and _is_ours(name[len(self.alias):])):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        if spec.name == self.parent:
            return types.ModuleType(spec.name, "The empty parent of an uninstalled checkout's kernels.")
        return importlib.import_module(self.target + spec.name[len(self.alias):])

    def exec_module(self, module):
        pass


def _hub_folder() -> Path | None:
    """The hub client's package folder, where its distribution is installed."""
    try:
        init = Path(importlib.metadata.distribution(HUB_DISTRIBUTION).locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return init.parent if init.is_file() and init.parent.resolve() != HERE else None


_hub = {}   # "folder": the hub client's folder where this package serves its API; "module": its __init__


def bind(package: types.ModuleType) -> None:
    """Make ``package`` (this one, first thing in its ``__init__``) the one copy under both
    names, and the hub client's API where it is the top-level ``kernels``."""
    name = package.__name__
    if name not in (INSTALLED, LAYOUT):
        return   # imported under a third name (vendored): nothing to alias
    twin = LAYOUT if name == INSTALLED else INSTALLED
    top_level = name == LAYOUT or _loads_these_files(LAYOUT)   # a checkout's root
    if twin not in sys.modules:
        if name == LAYOUT:   # the checkout's files win over an installed copy's
            uninstalled = importlib.util.find_spec(INSTALLED.partition(".")[0]) is None
            sys.meta_path.insert(0, _Alias(twin, name, make_parent=uninstalled))
        elif top_level:
            sys.meta_path.insert(0, _Alias(twin, name, make_parent=False))
    if top_level:
        folder = _hub_folder()
        if folder is not None:
            package.__path__.append(str(folder))
            _hub["folder"] = folder


def hub_attribute(package_name: str, attribute: str):
    """A name of the hub client's API, from its ``__init__`` (run once), for the package's
    ``__getattr__``; AttributeError where this package does not serve it."""
    missing = f"module {package_name!r} has no attribute {attribute!r}"
    if "folder" not in _hub or (attribute.startswith("__") and attribute != "__version__"):
        raise AttributeError(missing)
    if "module" not in _hub:
        spec = importlib.util.spec_from_file_location(f"{LAYOUT}.__hub__", _hub["folder"] / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:   # as AttributeError: hasattr() stays False, `from kernels import` an ImportError
            raise AttributeError(f"{missing}: Hugging Face's hub client in {_hub['folder']} failed to "
                                 f"import ({type(e).__name__}: {e})") from e
        _hub["module"] = module
    try:
        return getattr(_hub["module"], attribute)
    except AttributeError:
        raise AttributeError(f"{missing} (nor has Hugging Face's hub client, whose API it serves at a "
                             f"checkout's root)") from None
