import collections
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from spotocc.data.files import (
    DataFileError,
    MissingFileError,
    load_restricted_pickle,
    probe_image,
    read_binary,
    read_image,
)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_pickle_loads_plain_data_of_every_protocol(tmp_path, protocol):
    data = {
        "names": np.array(["car", "truck"]),
        "scalar": np.float64(1.5),
        "int": np.int64(3),
        "matrix": np.arange(6, dtype=np.float32).reshape(2, 3),
        "ordered": collections.OrderedDict(x=1),
        "set": {1, 2},
        "frozen": frozenset([3]),
        "bytes": b"xy",
        "complex": 1 + 2j,
        "nested": [{"a": (1, 2.0, None, True)}],
    }
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_restricted_pickle(path)
    assert loaded["names"].tolist() == ["car", "truck"] and loaded["scalar"] == 1.5 and loaded["int"] == 3
    assert np.array_equal(loaded["matrix"], data["matrix"]) and loaded["matrix"].dtype == np.float32
    assert loaded["set"] == {1, 2} and loaded["frozen"] == {3} and loaded["bytes"] == b"xy"
    assert loaded["ordered"] == {"x": 1} and loaded["complex"] == 1 + 2j
    assert loaded["nested"] == [{"a": (1, 2.0, None, True)}]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


class _Custom:
    pass


@pytest.mark.parametrize("payload", [_RunsCode(), _Custom(), np.random.default_rng(0)])
def test_restricted_pickle_refuses_anything_else(tmp_path, payload):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"infos": [payload]}, protocol=2))
    with pytest.raises(DataFileError, match="refusing to load"):
        load_restricted_pickle(path)


def test_read_binary_sizes(tmp_path):
    path = tmp_path / "a.bin"
    np.arange(6, dtype=np.float32).tofile(path)
    assert read_binary(path, np.float32, what="x", count=6).tolist() == [0, 1, 2, 3, 4, 5]
    assert read_binary(path, np.float32, what="x", row=3).shape == (6,)
    with pytest.raises(
        DataFileError, match=r"x has 24 bytes, expected 28 \(7 values of float32\) \(truncated\)"
    ):
        read_binary(path, np.float32, what="x", count=7)
    with pytest.raises(DataFileError, match="not a whole number of 4-value float32 rows"):
        read_binary(path, np.float32, what="x", row=4)
    with pytest.raises(MissingFileError, match="x is missing") as err:
        read_binary(tmp_path / "none.bin", np.float32, what="x")
    assert isinstance(err.value, FileNotFoundError) and err.value.path.endswith("none.bin")


def test_images(tmp_path):
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(tmp_path / "grey.png")  # converted to RGB
    img = read_image(tmp_path / "grey.png")
    assert img.mode == "RGB" and img.size == (7, 5) and probe_image(tmp_path / "grey.png") == (7, 5)
    Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8)).save(tmp_path / "c.jpg")
    (tmp_path / "t.jpg").write_bytes((tmp_path / "c.jpg").read_bytes()[:300])
    with pytest.raises(DataFileError, match=r"t\.jpg: image does not decode"):
        read_image(tmp_path / "t.jpg")
    (tmp_path / "d").mkdir()
    with pytest.raises(MissingFileError, match="image is not a file"):
        read_image(tmp_path / "d")
