"""Info files of every pickle protocol and numpy naming load; every way a pickle can run code is refused.

numpy 1 is not installed here, so numpy-1.x pickles are made by renaming ``numpy._core`` to
``numpy.core`` in the stream numpy 2 writes (``as_numpy1``) and by one hand-written protocol-0 file.
"""

import _compat_pickle
import builtins
import collections
import copyreg
import os
import pickle
import pickletools
import re

import numpy as np
import pytest

from spotocc.data.files import DataFileError, load_restricted_pickle

STRUCTURED = np.dtype([("x", "<f4"), ("ids", "<i8", (2,))])


def info_file_content() -> dict:
    """What an mmcv-written nuScenes info file holds, plus every other kind of plain data."""
    cams = collections.OrderedDict(
        CAM_FRONT=collections.OrderedDict(
            data_path="./data/nuscenes/samples/CAM_FRONT/n008-ünïcødé-路径.jpg",
            sensor2lidar_rotation=np.eye(3),
            cam_intrinsic=np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]),
        )
    )
    sample = {
        "lidar_path": "./data/nuscenes/samples/LIDAR_TOP/ünïcødé.pcd.bin",
        "token": "fd8420396768425eabec9bdddf7e64b6",
        "cams": cams,
        "gt_boxes": np.zeros((0, 7), dtype=np.float32),  # a sample without annotations
        "gt_names": np.array([], dtype="<U32"),
        "num_lidar_pts": np.zeros((0,), dtype=np.int64),
        "valid_flag": np.array([True, False]),
        "timestamp": np.int64(1533151603547590),
        "score": np.float64(0.25),
        "half": np.float32(0.5),
        "flag": np.bool_(True),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "structured": np.array([(1.5, [1, 2])], dtype=STRUCTURED),
        "record": np.array([(2.5, [3, 4])], dtype=STRUCTURED)[0],  # a numpy.void scalar
        "dtype": STRUCTURED,
        "bytes": (b"", b"\x00\xff"),
        "bytearrays": (bytearray(), bytearray(b"\x01")),
        "sets": ({1, 2}, frozenset(["a"]), set()),
        "complex": 1 - 2j,
        "plain": [None, True, 3, 2.5, "x", (1, (2,)), {"k": [1]}],
    }
    return {"infos": [sample], "metadata": collections.OrderedDict(version="v1.0-trainval")}


def as_numpy1(data: bytes) -> bytes:
    """The same pickle as numpy 1.x writes it: ``numpy._core`` renamed ``numpy.core`` (frames dropped)."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for i, (op, arg, pos) in enumerate(ops):
        raw = data[pos : ops[i + 1][2] if i + 1 < len(ops) else len(data)]
        if op.name == "FRAME":  # frame lengths would no longer match; frames are optional
            continue
        if isinstance(arg, str) and arg.startswith("numpy._core"):
            new = arg.replace("numpy._core", "numpy.core", 1)
            if op.name == "GLOBAL":  # "module name"
                raw = b"c" + new.replace(" ", "\n").encode() + b"\n"
            else:
                assert op.name == "SHORT_BINUNICODE", op.name
                raw = b"\x8c" + bytes([len(new)]) + new.encode()
        out += raw
    return bytes(out)


def assert_same(a, b, where="") -> None:
    """Equal values of the same types, arrays compared by dtype, shape, memory order and content."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.flags.f_contiguous == b.flags.f_contiguous, where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.void):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    else:
        assert a == b, where


@pytest.mark.parametrize("numpy_names", ["numpy2", "numpy1"])
@pytest.mark.parametrize("protocol", range(6))
def test_info_files_of_every_protocol_and_numpy_naming_load(tmp_path, protocol, numpy_names):
    content = info_file_content()
    data = pickle.dumps(content, protocol=protocol)
    if numpy_names == "numpy1":
        data = as_numpy1(data)
        assert b"numpy.core." in data and b"numpy._core" not in data
    path = tmp_path / "nuscenes_occ_infos_val.pkl"
    path.write_bytes(data)
    loaded = load_restricted_pickle(path, "info file")
    assert_same(loaded, content)
    assert loaded["infos"][0]["gt_boxes"].shape == (0, 7)


def test_the_mmcv_protocol_2_empty_array_of_the_issue(tmp_path):
    # mmcv.dump pickles at protocol 2: an empty array buffer becomes __builtin__.bytes, others _codecs.encode
    data = pickle.dumps({"gt_boxes": np.zeros((0, 7), np.float32), "b": np.ones(2)}, protocol=2)
    assert b"c__builtin__\nbytes\n" in data and b"c_codecs\nencode\n" in data
    (tmp_path / "i.pkl").write_bytes(data)
    loaded = load_restricted_pickle(tmp_path / "i.pkl")
    assert loaded["gt_boxes"].shape == (0, 7) and loaded["b"].tolist() == [1.0, 1.0]


def test_a_hand_written_numpy1_protocol_0_pickle(tmp_path):
    # an empty float32 (0, 7) array as numpy 1.x writes it at protocol 0, spelled out opcode by opcode
    text = (
        "cnumpy.core.multiarray\n_reconstruct\n"
        "(cnumpy\nndarray\n(I0\ntc_codecs\nencode\n(Vb\nVlatin1\ntRtR"  # _reconstruct(ndarray, (0,), b"b")
        "(I1\n(I0\nI7\ntcnumpy\ndtype\n(Vf4\nI00\nI01\ntR"  # state: version, shape, dtype("f4") ...
        "(I3\nV<\nNNNI-1\nI-1\nI0\ntb"  # ... the dtype's own state (little-endian)
        "I00\nc__builtin__\nbytes\n(tRtb."  # ... not Fortran order, empty buffer
    )
    path = tmp_path / "old.pkl"
    path.write_bytes(text.encode("ascii"))
    loaded = load_restricted_pickle(path)
    assert loaded.shape == (0, 7) and loaded.dtype == np.float32


# --------------------------------------------------------------------------------------------------
# everything that can run code stays refused


class _ReduceToSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ReduceExToSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce_ex__(self, protocol):
        return (os.system, (f"touch {self.marker}",))


class _Call:
    """Pickles as a call of ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Custom:
    pass


def _payloads(marker):
    """kind -> (object to pickle, the global the unpickler must refuse)."""
    system = f"{os.system.__module__}.system"  # posix.system
    return {
        "os.system reduce": (_ReduceToSystem(marker), system),
        "__reduce_ex__": (_ReduceExToSystem(marker), system),
        "builtins.eval": (_Call(builtins.eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        "builtins.exec": (_Call(builtins.exec, f"open({str(marker)!r}, 'w')"), "builtins.exec"),
        "builtins.getattr": (
            _Call(builtins.getattr, collections.OrderedDict, "fromkeys"),
            "builtins.getattr",
        ),
        "builtins.__import__": (_Call(builtins.__import__, "os"), "builtins.__import__"),
        "builtins.open": (_Call(builtins.open, str(marker), "w"), "io.open"),
        "copyreg._reconstructor": (
            _Call(copyreg._reconstructor, _Custom, object, None),
            "copyreg._reconstructor",
        ),
        "numpy.load": (_Call(np.load, str(marker)), "numpy.load"),
        "a class instance": (_Custom(), f"{__name__}._Custom"),
        "a numpy generator": (np.random.default_rng(0), "numpy.random._pickle.__generator_ctor"),
    }


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("kind", list(_payloads("m")))
def test_every_way_to_run_code_is_refused(tmp_path, protocol, kind):
    marker = tmp_path / "ran"
    payload, refused = _payloads(marker)[kind]
    if kind == "a class instance" and protocol < 2:  # protocols 0-1 rebuild instances through copyreg
        refused = "copyreg._reconstructor"
    if protocol < 3:  # protocols 0-2 spell module names the Python 2 way
        module, name = refused.rsplit(".", 1)
        refused = f"{_compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)}.{name}"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"infos": [payload]}, protocol=protocol))
    message = f"info file is not a plain pickle: refusing to load {refused}:"
    with pytest.raises(DataFileError, match=re.escape(message)):
        load_restricted_pickle(path, "info file")
    assert not marker.exists()


def test_codecs_encode_is_only_the_latin1_bytes_trick(tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(DataFileError, match="refusing _codecs.encode"):
        load_restricted_pickle(path)
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVlatin-1\ntR.")
    assert load_restricted_pickle(path) == b"abc"
