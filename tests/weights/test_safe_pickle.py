"""The restricted unpickler: arrays and containers load, BYOL's classes become inert stand-ins, code never runs."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest

from medtransfer.errors import CheckpointError, UnsafeCheckpointError
from medtransfer.weights.safe_pickle import StandIn, restricted_load


class _Payload:
    """Pickles as a call of ``fn(*args)``, the way a malicious weight file would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    "make",
    [
        lambda marker: _Payload(os.system, f"touch {marker}"),
        lambda marker: _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        lambda marker: _Payload(subprocess.call, ["touch", str(marker)]),
        lambda marker: {"weights": np.zeros(3), "extra": [_Payload(os.system, f"touch {marker}")]},
    ],
    ids=["os.system", "builtins.eval", "subprocess.call", "nested"],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path, make, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(make(marker), protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match="never executes code") as info:
        restricted_load(path)
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message
    assert any(name in message for name in ("posix.system", "builtins.eval", "subprocess.call"))


def test_refusal_names_the_global(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match=r"'posix\.system'"):
        restricted_load(pickle.dumps(_Payload(os.system, "true"), protocol=2))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_tree_round_trips(protocol):
    tree = {
        "w": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "scalars": [np.float64(1.5), np.int32(-3), np.bool_(True)],
        "ordered": collections.OrderedDict(b=np.ones(2, dtype=np.float16), a=(1, 2.5, "x", None)),
        "raw": b"\x00\x01latin", "empty": b"", "buf": bytearray(b"ab"), "set": {1, 2}, "frozen": frozenset({3}),
        "dtype": np.dtype("<u2"), "uint8": np.array([[1, 255]], dtype=np.uint8),
    }
    loaded = restricted_load(pickle.dumps(tree, protocol=protocol))
    assert loaded.keys() == tree.keys()
    for key in ("w", "fortran", "uint8"):
        assert loaded[key].dtype == tree[key].dtype and np.array_equal(loaded[key], tree[key])
    assert loaded["scalars"] == tree["scalars"] and type(loaded["scalars"][0]) is np.float64
    assert isinstance(loaded["ordered"], collections.OrderedDict) and list(loaded["ordered"]) == ["b", "a"]
    assert loaded["ordered"]["a"] == (1, 2.5, "x", None)
    assert (loaded["raw"], loaded["empty"], loaded["buf"]) == (b"\x00\x01latin", b"", bytearray(b"ab"))
    assert loaded["set"] == {1, 2} and loaded["frozen"] == frozenset({3}) and loaded["dtype"] == np.dtype("<u2")


def test_numpy_1_module_names_are_accepted():
    # The BYOL release was written with numpy 1, whose pickles name numpy.core.multiarray.
    data = pickle.dumps({"a": np.arange(4.0), "s": np.float32(2)}, protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in legacy
    loaded = restricted_load(legacy)
    assert np.array_equal(loaded["a"], np.arange(4.0)) and loaded["s"] == np.float32(2)


def test_python2_builtin_names_are_mapped():
    assert restricted_load(b"c__builtin__\nset\n((lI1\naI2\natR.") == {1, 2}


@pytest.fixture
def byol_like_modules(monkeypatch):
    """Importable look-alikes of the modules the BYOL pickle names, present only while pickling."""
    calls: list[str] = []
    data_structures = types.ModuleType("haiku._src.data_structures")
    dill_dill = types.ModuleType("dill._dill")
    device_array = types.ModuleType("jax._src.device_array")

    class FlatMapping(dict):
        def __reduce__(self):
            return FlatMapping, (dict(self),)

    class LarsState:
        def __init__(self, count):
            calls.append("LarsState.__init__")
            self.count, self.trace = count, np.zeros(2)

        def __setstate__(self, state):  # what would run if the real class were imported
            calls.append("LarsState.__setstate__")
            self.__dict__.update(state)

    def reconstruct_device_array(value):
        calls.append("reconstruct_device_array")
        return value

    def _create_namedtuple(name, fields, module):
        calls.append("_create_namedtuple")
        return collections.namedtuple(name, fields, module=module)

    class DeviceArray:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            return reconstruct_device_array, (self.value,)

    FlatMapping.__module__, FlatMapping.__qualname__ = data_structures.__name__, "FlatMapping"
    LarsState.__module__, LarsState.__qualname__ = "byol.utils.optimizers", "LarsState"
    optimizers = types.ModuleType("byol.utils.optimizers")
    optimizers.LarsState = LarsState
    data_structures.FlatMapping = FlatMapping
    reconstruct_device_array.__module__ = device_array.__name__
    reconstruct_device_array.__qualname__ = "reconstruct_device_array"
    device_array.reconstruct_device_array = reconstruct_device_array
    _create_namedtuple.__module__ = dill_dill.__name__
    _create_namedtuple.__qualname__ = "_create_namedtuple"
    dill_dill._create_namedtuple = _create_namedtuple
    for module in (data_structures, dill_dill, device_array, optimizers):
        monkeypatch.setitem(sys.modules, module.__name__, module)
        parts = module.__name__.split(".")
        for depth in range(1, len(parts)):  # pickle imports the parent packages too
            monkeypatch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    return types.SimpleNamespace(
        FlatMapping=FlatMapping, LarsState=LarsState, DeviceArray=DeviceArray, create=_create_namedtuple,
        calls=calls,
    )


def _dill_like_dumps(obj, namedtuple_classes) -> bytes:
    """Pickle as dill does: namedtuple classes through dill._dill._create_namedtuple, instances via NEWOBJ."""
    import io

    _create_namedtuple = sys.modules["dill._dill"]._create_namedtuple  # the look-alike installed by the fixture

    class DillLikePickler(pickle.Pickler):
        def reducer_override(self, value):
            if any(value is cls for cls in namedtuple_classes):
                return _create_namedtuple, (value.__name__, value._fields, value.__module__)
            return NotImplemented

    buffer = io.BytesIO()
    DillLikePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def test_byol_namespaces_become_inert_stand_ins(byol_like_modules, monkeypatch):
    m = byol_like_modules
    State = collections.namedtuple("_ByolExperimentState", ["online_params", "online_state"])
    State.__module__ = "byol.byol_experiment"
    params = m.FlatMapping({"res_net50/~/initial_conv": m.FlatMapping({"w": np.ones((7, 7, 3, 64), np.float32)})})
    checkpoint = {
        "experiment_state": State(online_params=params, online_state=m.FlatMapping({})),
        "opt": m.LarsState(3),
        "rng": m.DeviceArray(np.array([0, 42], dtype=np.uint32)),
        "step": 5004,
    }
    data = _dill_like_dumps(checkpoint, [State])
    for global_name in (
        b"chaiku._src.data_structures\nFlatMapping\n",
        b"cdill._dill\n_create_namedtuple\n",
        b"cjax._src.device_array\nreconstruct_device_array\n",
        b"cbyol.utils.optimizers\nLarsState\n",
        b"c_codecs\nencode\n",
    ):
        assert global_name in data  # the globals the real release names
    monkeypatch.undo()  # the reader has none of these modules installed
    m.calls.clear()

    loaded = restricted_load(data)
    assert m.calls == []  # not one line of the foreign classes ran
    state = loaded["experiment_state"]
    assert isinstance(state, StandIn) and state.qualified_name == "byol.byol_experiment._ByolExperimentState"
    online = state.online_params  # fields of the namedtuple read as attributes
    assert isinstance(online, StandIn) and list(online) == ["res_net50/~/initial_conv"]
    kernel = online["res_net50/~/initial_conv"]["w"]
    assert kernel.shape == (7, 7, 3, 64) and kernel.dtype == np.float32
    assert dict(state.online_state) == {} and len(online) == 1
    opt = loaded["opt"]
    assert opt.count == 3 and np.array_equal(opt.trace, np.zeros(2))  # state kept, __setstate__ never ran
    rng = loaded["rng"]
    assert rng.qualified_name == "jax._src.device_array.reconstruct_device_array"
    assert np.array_equal(rng.args[0], [0, 42]) and loaded["step"] == 5004
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(state)


def test_stand_in_names_cannot_reach_real_functions(tmp_path):
    marker = tmp_path / "pwned"
    # GLOBAL 'jax system' called with a shell command: the name is only a label on an inert record.
    data = b"cjax\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    record = restricted_load(data)
    assert isinstance(record, StandIn) and record.args == (f"touch {marker}",)
    assert not marker.exists()
    with pytest.raises(AttributeError, match="has no field 'nope'"):
        record.nope


@pytest.mark.parametrize(
    "data, match",
    [
        (b"c_codecs\nencode\n(Vabc\nVrot13\ntR.", "only latin-1"),
        (b"c__builtin__\nbytes\n(I1000000\ntR.", "non-sequence"),
        (b"cbuiltins\ngetattr\n(cbuiltins\ndict\nVfromkeys\ntR.", "builtins.getattr"),
        (b"ccopyreg\n_reconstructor\n.", "copyreg._reconstructor"),
    ],
)
def test_dangerous_uses_of_allowed_names_are_refused(data, match):
    with pytest.raises(UnsafeCheckpointError, match=match):
        restricted_load(data)


def test_corrupt_and_foreign_files_get_clear_errors(tmp_path):
    good = pickle.dumps({"a": np.arange(100.0)}, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable pickle") as info:
        restricted_load(good[: len(good) // 2])
    assert not isinstance(info.value, UnsafeCheckpointError)
    with pytest.raises(CheckpointError, match="PyTorch-serialised"):
        restricted_load(b"\x80\x02X\x01\x00\x00\x00aQ.")  # a persistent id, as in legacy torch files
    with pytest.raises(CheckpointError, match="does not exist"):
        restricted_load(tmp_path / "missing.pkl")
