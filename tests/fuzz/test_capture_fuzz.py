"""Property (as for every parser of outside bytes, `tests.fuzz.targets`): a capture message and
its records are accepted or refused with a reason, never another exception, never a hang, and
never memory out of proportion to the input, whatever shapes and sizes they declare."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.wire import capture as wc
from edgefleet.wire.message import MessageError
from tests.fuzz import targets as T
from tests.fuzz.strategies import hostile_json

DEVICE = "gw-1"


def valid_capture() -> dict[str, object]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return {
        "device_id": DEVICE,
        "records": [
            {
                "id": 7, "kind": "row", "capture_id": "cap-" + "0" * 16, "model": "iris",
                "version": "1.0.0", "ts": "2026-01-01T00:00:00Z",
                "inputs": {"X": wc.encode_tensor("float32", (2, 4), x.tobytes())},
                "outputs": {"y": wc.encode_tensor("int64", (2,), np.zeros(2, np.int64).tobytes())},
            },
            {"id": 8, "kind": "done", "capture_id": "cap-" + "0" * 16, "model": "iris",
             "rows": 2, "why": "rows"},
        ],
    }  # fmt: skip


class Refused(ValueError):
    pass


def _capture(data: bytes) -> object:
    """What the bridge does with a capture message: the envelope, then each record alone."""
    env = wc.parse_envelope(data, DEVICE)
    out = []
    for r in env.records:
        try:
            out.append(wc.parse_record(r))
        except wc.CaptureError as e:
            assert e.code and e.message  # every record refusal names its reason
    return out


TARGET = T.Target("capture", _capture, (MessageError,), T._message_reason)


def _declaring(shape: list[int], dtype: str, data_len: int) -> bytes:
    rec = dict(valid_capture()["records"][0])  # type: ignore[index]
    rec["inputs"] = {"X": {"dtype": dtype, "shape": shape, "data": "A" * data_len}}
    return T.encode_json({"records": [rec]})


@settings(max_examples=150, deadline=None)
@given(hostile_json(valid_capture()))
def test_capture_messages(data: bytes) -> None:
    T.check(TARGET, data)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(min_value=-5, max_value=2**70), min_size=0, max_size=10),
    st.sampled_from([*wc.DTYPES, "object", "<U8", ""]),
    st.integers(min_value=0, max_value=4096),
)
def test_declared_sizes_never_allocate(shape: list[int], dtype: str, data_len: int) -> None:
    """Whatever a record declares, memory follows the message's own size."""
    T.check(TARGET, _declaring(shape, dtype, data_len))


def test_the_valid_message_parses() -> None:
    rows = _capture(T.encode_json(valid_capture()))
    assert isinstance(rows, list) and isinstance(rows[0], wc.CaptureRow) and rows[0].rows == 2
