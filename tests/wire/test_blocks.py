"""The block list of a model file (wire.blocks): tensor-boundary cuts and their validation."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.wire import blocks
from edgefleet.wire.errors import RejectError
from edgefleet.wire.manifest import validate_manifest
from edgefleet.wire.reasons import ReasonCode
from tests.support.delta_models import mlp_bytes


def _tiles(bs: list[blocks.Block], data: bytes) -> None:
    pos = 0
    for b in bs:
        assert b.offset == pos and 0 < b.length <= blocks.CHUNK
        assert hashlib.sha256(data[b.offset : b.end]).hexdigest() == b.sha256
        pos = b.end
    assert pos == len(data)


def test_cut_tiles_the_model_at_tensor_boundaries_joining_small_pieces() -> None:
    data = mlp_bytes(0)
    bs = blocks.cut(data)
    _tiles(bs, data)
    bounds = {b.offset for b in bs} | {len(data)}
    spans = blocks.tensor_spans(data)
    assert len(spans) == 6  # w1 b1 w2 b2 w3 b3
    for s, e in spans:
        if e - s >= blocks.SMALL:  # a large tensor starts a block (its tail may join the next)
            assert s in bounds
    big = [b for b in bs if b.length >= blocks.SMALL]
    assert all(b.length <= blocks.CHUNK for b in bs) and big
    assert len(bs) < 12  # the biases and the graph bytes are joined, not a block each


def test_a_new_head_changes_only_the_head_blocks() -> None:
    a, b = blocks.cut(mlp_bytes(0)), blocks.cut(mlp_bytes(1))
    old = {x.sha256 for x in a}
    changed = [x for x in b if x.sha256 not in old]
    assert sum(x.length for x in changed) < 0.05 * sum(x.length for x in b)
    assert changed  # the head did change


def test_bytes_that_are_not_onnx_are_cut_into_plain_chunks() -> None:
    data = b"\xff" * (blocks.CHUNK * 2 + 5)
    bs = blocks.cut(data)
    _tiles(bs, data)
    assert [b.length for b in bs] == [blocks.CHUNK, blocks.CHUNK, 5]
    assert blocks.cut(b"") == []


def _manifest(model_size: int, block_list: Any) -> dict[str, Any]:
    return {
        "format": "edgefleet.package/v1",
        "name": "mlp",
        "version": "1.0.0",
        "profile": "cpu-x86_64",
        "min_agent_version": "0.1.0",
        "created": "2026-01-01T00:00:00Z",
        "members": {"model.onnx": {"sha256": "0" * 64, "size": model_size, "blocks": block_list}},
        "model": {"file": "model.onnx"},
        "io": {
            "inputs": [{"name": "X", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": "Y", "dtype": "float32", "shape": [None, 2]}],
        },
        "execution_providers": [{"name": "CPUExecutionProvider"}],
        "cpu_fallback": True,
        "gates": {},
    }


H = "a" * 64


def test_a_block_list_that_tiles_the_model_is_valid() -> None:
    validate_manifest(_manifest(30, [[0, 10, H], [10, 20, H]]))


@pytest.mark.parametrize(
    "block_list",
    [
        [[0, 10, H], [12, 18, H]],  # a gap
        [[0, 10, H], [8, 22, H]],  # an overlap
        [[0, 10, H]],  # short of the file
        [[0, 10, H], [10, 30, H]],  # past the file
        [[0, 0, H], [0, 30, H]],  # an empty block
        [[10, 20, H], [0, 10, H]],  # out of order
        [[0, 30, "A" * 64]],  # not a lower-case hex digest
        [[0, 30]],
        [[0, True, H]],
        "0-30",
    ],
)
def test_a_block_list_that_does_not_tile_the_model_is_refused(block_list: Any) -> None:
    with pytest.raises(RejectError) as e:
        validate_manifest(_manifest(30, block_list))
    assert e.value.code is ReasonCode.MANIFEST_INVALID
    assert "members.model.onnx.blocks" in e.value.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, 1000))
def test_any_json_block_list_is_valid_or_refused_with_its_reason(value: Any, size: int) -> None:
    try:
        got = blocks.check_blocks(value, size)
    except RejectError as e:
        assert e.code is ReasonCode.MANIFEST_INVALID
    else:
        assert sum(b.length for b in got) == size


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_any_bytes_cut_into_a_tiling(data: bytes) -> None:
    bs = blocks.cut(data, chunk=512, small=64)
    pos = 0
    for b in bs:
        assert b.offset == pos and b.length > 0
        pos = b.end
    assert pos == len(data)
    assert blocks.check_blocks(blocks.to_json(bs), len(data)) == bs
