"""producer.outputs: output names, CSR rows and multi-vectors (take, the wire round trip, scipy)."""

from __future__ import annotations

import numpy as np
import pytest

from producer.outputs import MultiVectors, SparseRows, canonical_outputs, parse_outputs

RNG = np.random.default_rng(0)
PAIRS = [(np.sort(RNG.choice(100, k, replace=False)).astype(np.int32), RNG.random(k).astype(np.float32))
         for k in (3, 0, 5, 1, 7)]


def test_output_names() -> None:
    assert canonical_outputs(["multivector", "Dense", "dense"]) == ("dense", "multivector")
    assert parse_outputs("sparse, dense") == ("dense", "sparse") and parse_outputs("") is None
    with pytest.raises(ValueError, match="unknown output 'colbert'; choose from dense, sparse, multivector"):
        canonical_outputs(["colbert"])
    with pytest.raises(ValueError, match="name at least one"):
        canonical_outputs([" "])


@pytest.mark.parametrize("rows", [[4, 0, 2], [], [1], [1, 1, 3], [0, 1, 2, 3, 4]])
def test_take_equals_rebuilding_from_the_rows(rows: list[int]) -> None:
    got = SparseRows.from_pairs(PAIRS, 100).take(rows)
    want = SparseRows.from_pairs([PAIRS[i] for i in rows], 100)
    for name in ("offsets", "indices", "values"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    arrays = [RNG.random((k, 4)).astype(np.float32) for k in (2, 0, 3, 1, 4)]
    multi = MultiVectors.from_arrays(arrays, 4).take(rows)
    assert multi.counts == [len(arrays[i]) for i in rows]
    for position, row in enumerate(rows):
        np.testing.assert_array_equal(multi[position], arrays[row])


def test_wire_round_trip_and_scipy() -> None:
    rows = SparseRows.from_pairs(PAIRS, 100)
    wire = rows.to_wire()
    back = SparseRows.from_wire(wire["sparse_counts"], wire["sparse_indices_b64"], wire["sparse_values_b64"],
                                wire["vocab_size"])
    for a, b in zip(rows, back):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values, b.values)
    indices, values = back[0]
    assert back[0].as_dict() == {int(i): float(v) for i, v in zip(indices, values)}
    matrix = back.to_scipy()
    assert matrix.shape == (5, 100) and matrix.nnz == 16
    np.testing.assert_array_equal(matrix[2].toarray()[0][PAIRS[2][0]], PAIRS[2][1])
    multi = MultiVectors.from_arrays([np.ones((2, 3)), np.zeros((0, 3))], 3)
    wire = multi.to_wire()
    again = MultiVectors.from_wire(wire["multivector_counts"], wire["multivector_dims"], wire["multivector_b64"])
    assert again.counts == [2, 0] and again.dims == 3 and again[0].sum() == 6
