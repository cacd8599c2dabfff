"""The delta codecs: round-trip bounds, exact fp32, and hostile payloads rejected before allocation."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common import sparse
from common.codec import (
    Codec,
    DecodeError,
    apply_delta,
    decode,
    decode_delta,
    decode_sync,
    encode,
    encode_delta,
    payload_bytes,
    to_record,
    wire_bytes,
)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 10, generator=g) * torch.linspace(0.01, 5.0, 6)[:, None],  # rows of very different size
        "b": torch.randn(7, generator=g),
        "z": torch.zeros(3, 4),
    }


def test_fp32_is_exact():
    t = tensors()
    back = decode_delta(encode_delta(t, Codec("fp32")), t, Codec("fp32"))
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_a_decoded_move_applied_to_the_base_reaches_the_target():
    base, target = tensors(1), tensors(2)
    moves = decode_delta(encode_delta({k: target[k] - base[k] for k in base}, Codec("fp32")), base, Codec("fp32"))
    for k in base:
        torch.testing.assert_close(apply_delta(base[k], moves[k]), target[k], rtol=0, atol=1e-6)


def test_bf16_relative_bound():
    t = tensors()
    back = decode_delta(encode_delta(t, Codec("bf16")), t, Codec("bf16"))
    for k in t:
        assert ((back[k] - t[k]).abs() <= t[k].abs() * 2**-8).all(), k


@pytest.mark.parametrize("block", [0, 4, 64])
def test_int8_error_within_half_a_step_of_its_block(block):
    t = tensors()
    codec = Codec("int8", block)
    arrays = encode_delta(t, codec)
    back = decode_delta(arrays, t, codec)
    for k, x in t.items():
        b = codec.block_len(tuple(x.shape))
        flat = torch.nn.functional.pad(x.reshape(-1), (0, codec.num_blocks(tuple(x.shape)) * b - x.numel()))
        step = flat.view(-1, b).abs().amax(dim=1) / 127  # the scale of each block
        err = torch.nn.functional.pad((back[k] - x).reshape(-1).abs(), (0, flat.numel() - x.numel())).view(-1, b)
        assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-12).all(), k
    assert torch.equal(back["z"], t["z"])  # an all-zero block stays zero (scale 0, no division by it)


@pytest.mark.parametrize(
    ("block", "shape", "length", "count"),
    [
        (0, (6, 10), 10, 6),
        (4, (6, 10), 4, 15),
        (0, (), 1, 1),
        (0, (7,), 7, 1),
        (0, (5, 0), 1, 0),
        (0, (0, 5), 1, 0),
        (0, (3, 1), 1, 3),
        (3, (2, 0), 3, 0),
    ],
)
def test_int8_block_length_and_count_by_hand(block, shape, length, count):
    codec = Codec("int8", block)
    assert (codec.block_len(shape), codec.num_blocks(shape)) == (length, count)


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8"])
def test_every_codec_carries_a_scalar(name):
    t = {"s": torch.tensor(-3.0)}  # exact in each: bf16 holds -3, int8's one block has max |x| = 3
    back = decode_delta(encode_delta(t, Codec(name)), t, Codec(name))
    assert back["s"].shape == () and torch.equal(back["s"], t["s"])


def test_int8_scale_count_per_row_and_per_block():
    t = {"w": torch.randn(6, 10)}
    assert encode_delta(t, Codec("int8", 0))["w#int8-scale"].shape == (6,)
    assert encode_delta(t, Codec("int8", 16))["w#int8-scale"].shape == (4,)  # ceil(60 / 16)
    # 60 int8 values + 6 float32 scales
    assert payload_bytes(to_record(encode_delta(t, Codec("int8", 0)))) == 60 + 6 * 4


def test_wire_bytes_count_headers():
    t = {"w": torch.randn(6, 10)}
    rec = to_record(encode_delta(t, Codec("fp32")))
    assert payload_bytes(rec) == 240
    assert wire_bytes(rec) == len(rec["w#fp32"].data) > 240


def _npy(header_shape, data_len, dtype="<f4"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": header_shape})
    return buf.getvalue() + b"\0" * data_len


def test_oversized_declared_shape_rejected_before_allocation():
    expected = {"w": torch.zeros(6, 10)}
    # The header claims 10^12 elements: the decoder must refuse from the header alone.
    huge = Array(dtype="float32", shape=(10**6, 10**6), stype="numpy.ndarray", data=_npy((10**6, 10**6), 16))
    with pytest.raises(DecodeError, match="bytes|expected"):
        decode_sync(ArrayRecord({"w#fp32": huge}), expected, Codec("fp32"))
    # A well-formed array of the wrong shape for this tensor.
    wrong = Array(np.zeros((7, 10), dtype=np.float32))
    with pytest.raises(DecodeError, match=r"expected \(6, 10\)"):
        decode_sync(ArrayRecord({"w": wrong}), expected, Codec("fp32"))


def test_truncated_and_padded_data_rejected():
    expected = {"w": torch.zeros(6, 10)}
    good = encode_delta(expected, Codec("int8"))
    rec = to_record(good)
    arr = rec["w#int8"]
    for data in (arr.data[:-1], arr.data + b"\0"):
        bad = ArrayRecord(
            {
                "w#int8": Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=data),
                "w#int8-scale": rec["w#int8-scale"],
            }
        )
        with pytest.raises(DecodeError, match=r"^w#int8: \d+ bytes, a \(6, 10\) int8 array takes exactly"):
            decode_sync(bad, expected, Codec("int8"))
    # A whole value of the wrong shape is named too: the operator must see which tensor was wrong.
    with pytest.raises(DecodeError, match=r"^w: got \(5, 10\) float32, expected \(6, 10\) float32"):
        decode_sync(to_record({"w": np.zeros((5, 10), np.float32)}), expected, Codec("int8"))


def test_wrong_scale_count_nan_scale_and_missing_part_rejected():
    expected = {"w": torch.zeros(6, 10)}
    arrays = encode_delta({"w": torch.randn(6, 10)}, Codec("int8"))
    with pytest.raises(DecodeError, match="int8-scale"):
        decode_sync(to_record({**arrays, "w#int8-scale": np.ones(5, np.float32)}), expected, Codec("int8"))
    for scale in (np.full(6, np.nan, np.float32), np.full(6, -0.5, np.float32)):
        with pytest.raises(DecodeError, match="^w#int8-scale: scales must be finite and >= 0"):
            decode_sync(to_record({**arrays, "w#int8-scale": scale}), expected, Codec("int8"))
    _, zero = decode_sync(to_record({**arrays, "w#int8-scale": np.zeros(6, np.float32)}), expected, Codec("int8"))
    assert torch.equal(zero["w"], torch.zeros(6, 10))  # a zero scale is an all-zero block
    with pytest.raises(DecodeError, match="not a int8 delta"):
        decode_sync(to_record({"w#int8": arrays["w#int8"]}), expected, Codec("int8"))
    with pytest.raises(DecodeError, match="not a parameter"):
        decode_sync(to_record({"v#int8": arrays["w#int8"]}), expected, Codec("int8"))
    with pytest.raises(DecodeError, match="not a bf16 delta"):  # the run's codec decides what is accepted
        decode_sync(to_record(arrays), expected, Codec("bf16"))


@pytest.mark.parametrize(("name", "dtype"), [("fp32", np.float32), ("bf16", np.int16)])
def test_a_delta_of_the_wrong_shape_is_named(name, dtype):
    with pytest.raises(DecodeError, match=rf"^w#{name}: got \(3,\) {np.dtype(dtype)}, expected \(6, 10\)"):
        decode_sync(to_record({f"w#{name}": np.zeros(3, dtype)}), {"w": torch.zeros(6, 10)}, Codec(name))


def test_a_relay_accepts_each_allowed_codec_for_what_it_is():
    expected = {"w": torch.zeros(6, 10), "b": torch.zeros(7)}
    t = {"w": torch.randn(6, 10), "b": torch.randn(7)}
    arrays = {**encode_delta({"w": t["w"]}, Codec("int8")), **encode_delta({"b": t["b"]}, Codec("fp32"))}
    full, deltas = decode_sync(to_record(arrays), expected, [Codec("fp32"), Codec("int8")])
    assert full == {} and torch.equal(deltas["b"], t["b"])
    assert torch.equal(
        deltas["w"], decode_delta(encode_delta({"w": t["w"]}, Codec("int8")), expected, Codec("int8"))["w"]
    )


def test_whole_tensors_are_checked_against_the_model_by_name_shape_and_dtype():
    expected = {"w": torch.zeros(2, 3), "d": torch.zeros(4, dtype=torch.float64)}
    good = {"w": torch.arange(6.0).reshape(2, 3), "d": torch.arange(4.0, dtype=torch.float64)}
    back = decode(encode(good), expected)
    assert all(torch.equal(back[k], good[k]) and back[k].dtype == good[k].dtype for k in good)
    for tensors, message in (
        ({"w": torch.zeros(3, 2)}, r"^w: got \(3, 2\) float32, expected \(2, 3\) float32"),
        ({"w": torch.zeros(2, 3, dtype=torch.float64)}, r"^w: got \(2, 3\) float64, expected \(2, 3\) float32"),
        ({"d": torch.zeros(4)}, r"^d: got \(4,\) float32, expected \(4,\) float64"),
    ):
        with pytest.raises(DecodeError, match=message):
            decode(encode(tensors), expected)
    broken = ArrayRecord({"w": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"\x93NUMPY")})
    with pytest.raises(DecodeError, match="^w: broken .npy header"):
        decode(broken, expected)


def test_a_transposed_array_travels_in_c_order():
    # The decoder refuses Fortran-ordered data, so to_record must lay out what it is given.
    w = np.arange(12, dtype=np.float32).reshape(3, 4).T
    assert not w.flags.c_contiguous
    _, deltas = decode_sync(to_record({"w#fp32": w}), {"w": torch.zeros(4, 3)}, Codec("fp32"))
    assert torch.equal(deltas["w"], torch.from_numpy(np.ascontiguousarray(w)))


def test_object_dtype_never_unpickled():
    data = _npy((6, 10), 0, dtype="|O")
    arr = Array(dtype="object", shape=(6, 10), stype="numpy.ndarray", data=data)
    with pytest.raises(DecodeError):
        decode_sync(ArrayRecord({"w": arr}), {"w": torch.zeros(6, 10)}, Codec("fp32"))


def test_codec_settings_checked():
    with pytest.raises(ValueError, match="unknown codec"):
        Codec("int4")
    for block in (-1, True, 2.0, "4"):
        with pytest.raises(ValueError, match="int8 block must be an integer >= 0"):
            Codec("int8", block)
    assert Codec("int8", 0).block == 0


@pytest.mark.parametrize("version", [(2, 0), (3, 0)])
def test_npy_headers_of_versions_2_and_3_decode(version):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2, 3)})
    data = buf.getvalue()
    data = data[:6] + bytes(version) + data[8:] + t.numpy().tobytes()
    record = ArrayRecord({"w": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)})
    assert torch.equal(decode(record, {"w": torch.zeros(2, 3)})["w"], t)


def test_a_dtype_outside_the_accepted_ones_is_refused():
    data = _npy((2,), 16, dtype="<c8")  # complex64: neither an object dtype nor one the codec takes
    record = ArrayRecord({"w": Array(dtype="complex64", shape=(2,), stype="numpy.ndarray", data=data)})
    with pytest.raises(DecodeError, match="dtype complex64 is not accepted"):
        decode(record)


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"chunk": 0}, "top-k chunk must be an integer >= 1"),
        ({"chunk": True}, "top-k chunk must be an integer >= 1"),
        ({"chunk": 1.5}, "top-k chunk must be an integer >= 1"),
        ({"chunk": "8"}, "top-k chunk must be an integer >= 1"),
        ({"fraction": 0}, r"top-k fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"top-k fraction must be in \(0, 1\]"),
        ({"fraction": "1"}, r"top-k fraction must be in \(0, 1\]"),
    ],
)
def test_a_codec_refuses_settings_outside_their_range(setting, reason):
    with pytest.raises(ValueError, match=reason):
        Codec("topk2", **setting)


def test_a_codec_takes_the_edges_of_its_ranges():
    """One element per chunk, all of it kept, one int8 scale per row: the smallest settings allowed."""
    one = Codec("topk4", chunk=1, fraction=1)  # each element its own chunk and its own scale
    assert one.topk == sparse.TopK(1, 1.0, 4)
    assert Codec("int8", block=0).block_len((3, 5)) == 5
    t = torch.randn(7)
    back = decode_delta(encode_delta({"w": t}, one), {"w": t}, one)["w"]
    assert (back - t).abs().le(t.abs() / 16 * (1 + 1e-6)).all() and back.ne(0).all()  # the documented bound


@pytest.mark.parametrize("version", [1, 2])
def test_an_npy_header_is_read_up_to_10000_bytes_and_no_longer(version):
    """numpy's own guard against headers too long to parse safely, at the bound the codec sets."""
    import struct

    def array(length: int) -> Array:
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
        header = (header + " " * (length - len(header) - 1) + "\n").encode()
        size = struct.pack("<H", length) if version == 1 else struct.pack("<I", length)
        data = b"\x93NUMPY" + bytes((version, 0)) + size + header + np.float32([1.5, -2.0]).tobytes()
        return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=data)

    got = decode(ArrayRecord({"w": array(10_000)}), {"w": torch.zeros(2)})["w"]
    assert torch.equal(got, torch.tensor([1.5, -2.0]))
    with pytest.raises(DecodeError, match=r"^w: broken .npy header .*Header info length \(10001\)"):
        decode(ArrayRecord({"w": array(10_001)}), {"w": torch.zeros(2)})
