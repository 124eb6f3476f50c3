"""Bit packing and the 2:4 index encoding: exact round trips (hypothesis) and the documented layout."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from algo.common import AccllmError
from quant.pack import PATTERNS_24, decode_24, encode_24, pack_bits, packed_nbytes, unpack_bits


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    n = data.draw(st.integers(0, 300))
    codes = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n)), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_nbytes(n, bits)
    assert np.array_equal(unpack_bits(packed, bits, n), codes)


def test_lsb_first_layout():
    # element 0 in the least significant bits of byte 0
    assert pack_bits([1, 2, 3, 0], 2).tolist() == [0b00111001]
    assert pack_bits([0xA, 0x5], 4).tolist() == [0x5A]
    # 3-bit codes straddle bytes: 7,0,5 -> bits 111 000 101 (LSB first) -> 0b01000111, 0b00000001
    assert pack_bits([7, 0, 5], 3).tolist() == [0b01000111, 0b00000001]


def test_pack_refuses_out_of_range():
    with pytest.raises(AccllmError, match="out of range"):
        pack_bits([4], 2)
    with pytest.raises(AccllmError, match="bytes"):
        unpack_bits(np.zeros(1, np.uint8), 4, 5)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_24_round_trip(data):
    n = data.draw(st.integers(1, 6))
    g4 = data.draw(st.integers(1, 8))
    pats = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n * g4, max_size=n * g4))).reshape(n, g4)
    mask = np.zeros((n, 4 * g4), bool)
    for r in range(n):
        for c in range(g4):
            a, b = PATTERNS_24[pats[r, c]]
            mask[r, 4 * c + a] = mask[r, 4 * c + b] = True
    codes = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n * 4 * g4, max_size=n * 4 * g4)),
                     dtype=np.int64).reshape(n, 4 * g4)
    fill = np.full_like(codes, 9)
    kept, idx = encode_24(codes, mask)
    assert np.array_equal(idx, pats)
    dense, m2 = decode_24(kept, idx, 4 * g4, fill)
    assert np.array_equal(m2, mask)
    assert np.array_equal(dense, np.where(mask, codes, 9))
    # and through the 3-bit packing
    idx2 = unpack_bits(pack_bits(idx, 3), 3, idx.size).reshape(idx.shape)
    assert np.array_equal(idx2, idx)


def test_24_pattern_order_and_refusal():
    assert PATTERNS_24 == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    kept, idx = encode_24(np.array([[5, 6, 7, 8]]), np.array([[False, True, False, True]]))
    assert kept.tolist() == [[6, 8]] and idx.tolist() == [[4]]
    with pytest.raises(AccllmError, match="2:4"):
        encode_24(np.zeros((1, 4)), np.array([[True, True, True, False]]))
