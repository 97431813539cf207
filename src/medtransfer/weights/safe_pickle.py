"""A restricted unpickler for foreign weight files that are plain pickles (DeepMind's BYOL ``.pkl`` release).

``pickle.load`` runs whatever callables a file names, so a weight file could run code on the reader's machine.
:func:`restricted_load` admits only what a tree of arrays needs: numpy array, scalar and dtype reconstruction,
builtin containers and ``collections.OrderedDict``. The BYOL release (deepmind-research ``byol/utils/checkpointing.py``
writes it with ``dill.dump(..., protocol=2)``) also names haiku's parameter mappings
(``haiku._src.data_structures.FlatMapping`` / ``frozendict``), dill's namedtuple factory
(``dill._dill._create_namedtuple``, for ``_ByolExperimentState`` and optimiser states) and jax arrays. Globals from
those namespaces are replaced by :class:`StandIn` records: they keep the arguments and state the pickle gives them
and expose them as attributes or as a mapping, and none of their own code runs. Any other global is refused with
:class:`~medtransfer.errors.UnsafeCheckpointError`.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import os
import pickle
from typing import Any, BinaryIO, ClassVar, Iterator, Mapping

import numpy as np

from ..errors import CheckpointError, UnsafeCheckpointError

# Namespaces of the BYOL release whose classes and functions become inert stand-ins.
STAND_IN_NAMESPACES = ("byol", "haiku", "jax", "jaxlib", "optax", "dill")

# Field names of classes that dill pickles by reference rather than through ``_create_namedtuple``, so that their
# stand-ins still answer ``state.online_params`` (deepmind-research ``byol/byol_experiment.py``).
_KNOWN_FIELDS = {
    "byol.byol_experiment._ByolExperimentState": (
        "online_params",
        "target_params",
        "online_state",
        "target_state",
        "opt_state",
    ),
}


class StandIn:
    """Inert record standing for an object of a foreign class that the pickle names.

    ``args``/``kwargs`` hold what the pickle passed to the constructor, ``state`` what it passed to
    ``__setstate__``. Named fields (a namedtuple's, or a ``dict`` state's keys) read as attributes; a record built
    from one mapping (haiku's ``FlatMapping(dict)``) or with a mapping state reads as that mapping.
    """

    qualified_name: ClassVar[str] = "?"
    fields: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        self = object.__new__(cls)
        self.__dict__.update(args=args, kwargs=kwargs, state=None)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments were kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __reduce__(self):  # a stand-in must never be written back out as if it were the real object
        raise TypeError(f"a stand-in for {self.qualified_name} cannot be pickled")

    def field_values(self) -> dict[str, Any]:
        values = dict(zip(self.fields, self.args))
        values.update(self.kwargs)
        state = self.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], Mapping):
            state = state[1]  # (dict, slots) state of a class with __slots__
        if isinstance(state, Mapping):
            values.update(state)
        return values

    def mapping(self) -> Mapping[Any, Any] | None:
        """The mapping this record stands for, when it stands for one."""
        args = self.__dict__.get("args", ())
        if not self.fields and len(args) == 1 and not self.kwargs and isinstance(args[0], Mapping):
            return args[0]
        state = self.__dict__.get("state")
        if not self.fields and not args and isinstance(state, Mapping):
            return state
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        values = self.field_values()
        if name in values:
            return values[name]
        raise AttributeError(f"stand-in for {self.qualified_name} has no field '{name}' (fields: {list(values)})")

    def _require_mapping(self) -> Mapping[Any, Any]:
        mapping = self.mapping()
        if mapping is None:
            raise TypeError(f"stand-in for {self.qualified_name} is not a mapping")
        return mapping

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int) and self.mapping() is None:
            return self.args[key]
        return self._require_mapping()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._require_mapping())

    def __len__(self) -> int:
        return len(self._require_mapping())

    def __bool__(self) -> bool:  # a record is truthy whatever it holds; __len__ applies to mappings only
        return True

    def __contains__(self, key: Any) -> bool:
        mapping = self.mapping()
        return key in mapping if mapping is not None else key in self.field_values()

    def keys(self):
        return self._require_mapping().keys()

    def values(self):
        return self._require_mapping().values()

    def items(self):
        return self._require_mapping().items()

    def get(self, key: Any, default: Any = None) -> Any:
        return self._require_mapping().get(key, default)

    def __repr__(self) -> str:
        mapping = self.mapping()
        if mapping is not None:
            return f"StandIn[{self.qualified_name}]({len(mapping)} entries)"
        return f"StandIn[{self.qualified_name}](fields={list(self.field_values())}, n_args={len(self.args)})"


def _stand_in_class(qualified_name: str, fields: tuple[str, ...] = ()) -> type[StandIn]:
    short = qualified_name.rsplit(".", 1)[-1]
    name = short if short.isidentifier() else "StandIn"
    return type(name, (StandIn,), {"qualified_name": qualified_name, "fields": tuple(fields)})


def _stand_in_namedtuple(name: str, fields: Any, module: str = "?", defaults: Any = None) -> type[StandIn]:
    """Replaces ``dill._dill._create_namedtuple``: a stand-in class with the namedtuple's field names."""
    if not (isinstance(fields, (tuple, list)) and all(isinstance(f, str) for f in fields)):
        raise UnsafeCheckpointError("dill namedtuple record with malformed field names")
    return _stand_in_class(f"{module}.{name}", tuple(fields))


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1'); no other codec is needed.
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafeCheckpointError(f"the pickle calls _codecs.encode with codec {encoding!r}; only latin-1 is allowed")
    return text.encode("latin-1")


def _safe_bytes(*args: Any) -> bytes:
    if args and not isinstance(args[0], (bytes, bytearray, list, tuple, str)):
        raise UnsafeCheckpointError("the pickle builds bytes from a non-sequence (a size); refused")
    return bytes(*args)


def _safe_bytearray(*args: Any) -> bytearray:
    if args and not isinstance(args[0], (bytes, bytearray, list, tuple, str)):
        raise UnsafeCheckpointError("the pickle builds a bytearray from a non-sequence (a size); refused")
    return bytearray(*args)


def _numpy_core() -> Any:
    # numpy 2 moved the reconstruction helpers to numpy._core; pickles from numpy 1 name numpy.core.
    try:
        from numpy import _core as core  # type: ignore[attr-defined]
    except ImportError:  # numpy < 2
        from numpy import core  # type: ignore[no-redef]
    return core


def _allowed_globals() -> dict[tuple[str, str], Any]:
    core = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _safe_bytes,
        ("builtins", "bytearray"): _safe_bytearray,
        ("dill._dill", "_create_namedtuple"): _stand_in_namedtuple,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    for container in (dict, list, tuple, set, frozenset):
        allowed[("builtins", container.__name__)] = container
    return allowed


def _numpy2_dtype_class(module: str, name: str) -> Any | None:
    """numpy 2 pickles some dtypes through their ``numpy.dtypes.<Kind>DType`` class."""
    if module != "numpy.dtypes" or not name.endswith("DType"):
        return None
    dtypes = getattr(np, "dtypes", None)
    candidate = getattr(dtypes, name, None) if dtypes is not None else None
    if isinstance(candidate, type) and issubclass(candidate, np.dtype):
        return candidate
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` admits numpy arrays and containers, stands in for BYOL's classes, refuses
    everything else."""

    def __init__(self, file: BinaryIO, *, source_name: str = "the file"):
        super().__init__(file)
        self._source_name = source_name
        self._allowed = _allowed_globals()
        self._stand_ins: dict[str, type[StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles written by Python 2 name modules as Python 2 did (__builtin__, copy_reg, ...).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)

        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        dtype_class = _numpy2_dtype_class(module, name)
        if dtype_class is not None:
            return dtype_class
        if module.split(".", 1)[0] in STAND_IN_NAMESPACES:
            qualified = f"{module}.{name}"
            if qualified not in self._stand_ins:
                self._stand_ins[qualified] = _stand_in_class(qualified, _KNOWN_FIELDS.get(qualified, ()))
            return self._stand_ins[qualified]
        raise UnsafeCheckpointError(
            f"refusing to load {self._source_name}: the pickle asks for the global '{module}.{name}', which is not "
            "an array, a container or a known weight-file class. medtransfer never executes code stored in weight "
            "files. If you trust the file, load it yourself and save its tensors with safetensors or "
            "torch.save(state_dict)."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self._source_name} is a PyTorch-serialised file, not a plain pickle: read it with torch.load"
        )


def restricted_load(path_or_file: str | os.PathLike | BinaryIO | bytes) -> Any:
    """Unpickle a foreign weight file without running any code it names.

    Accepts a path, an open binary file or the pickle's bytes. Raises :class:`UnsafeCheckpointError` when the
    pickle needs a global outside the allow-list, :class:`CheckpointError` when it is truncated or corrupt.
    """
    if isinstance(path_or_file, (bytes, bytearray)):
        return _load(io.BytesIO(path_or_file), "the pickled bytes")
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        try:
            with open(path, "rb") as handle:
                return _load(handle, f"'{path}'")
        except FileNotFoundError:
            raise CheckpointError(f"weight file '{path}' does not exist") from None
    return _load(path_or_file, f"'{getattr(path_or_file, 'name', 'the file')}'")


def _load(handle: BinaryIO, source_name: str) -> Any:
    unpickler = RestrictedUnpickler(handle, source_name=source_name)
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(
            f"{source_name} is not a readable pickle (truncated, corrupt or of another format): {exc}"
        ) from exc

