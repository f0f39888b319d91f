"""Phoenix socket frames, server side: the V1 JSON object form (what gateways speak) and the V2 array form.

Phoenix picks the serializer from the ``vsn`` query parameter: none or ``1.x`` selects V1
(``{"topic","event","payload","ref"}``), ``2.x`` selects V2 (``[join_ref, ref, topic, event, payload]``).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any


class FrameError(ValueError):
    """A text frame that is not a Phoenix message."""


class Serializer(enum.Enum):
    V1 = "1.0.0"
    V2 = "2.0.0"


def serializer_for_vsn(vsn: str | None) -> Serializer:
    """Phoenix's negotiation: absent or 1.x → V1, 2.x → V2; anything else is refused (``ValueError``)."""
    if vsn is None or vsn == "" or vsn.startswith("1."):
        return Serializer.V1
    if vsn.startswith("2."):
        return Serializer.V2
    raise ValueError(f"unsupported serializer version {vsn!r}")


Ref = str | int | None


@dataclass(frozen=True, slots=True)
class Frame:
    topic: str
    event: str
    payload: Any
    ref: Ref
    join_ref: Ref = None


def _check_ref(value: Any, name: str) -> Ref:
    # bool is an int subclass in Python but never a valid ref on the wire
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise FrameError(f"{name} must be a string, an integer or null, not {type(value).__name__}")


def decode(text: str, serializer: Serializer) -> Frame:
    """One inbound text frame; raises only :class:`FrameError`."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if serializer is Serializer.V1:
        if not isinstance(data, dict):
            raise FrameError("a V1 frame is a JSON object")
        missing = {"topic", "event", "payload", "ref"} - data.keys()
        if missing:
            raise FrameError(f"missing keys {sorted(missing)}")
        topic, event, payload = data["topic"], data["event"], data["payload"]
        ref = _check_ref(data["ref"], "ref")
        join_ref = _check_ref(data.get("join_ref"), "join_ref")
    else:
        if not isinstance(data, list) or len(data) != 5:
            raise FrameError("a V2 frame is a JSON array of five elements")
        join_ref = _check_ref(data[0], "join_ref")
        ref = _check_ref(data[1], "ref")
        topic, event, payload = data[2], data[3], data[4]
    if not isinstance(topic, str) or not isinstance(event, str):
        raise FrameError("topic and event must be strings")
    return Frame(topic=topic, event=event, payload=payload, ref=ref, join_ref=join_ref)


def encode(frame: Frame, serializer: Serializer) -> str:
    if serializer is Serializer.V1:
        return json.dumps({"topic": frame.topic, "event": frame.event, "payload": frame.payload, "ref": frame.ref})
    return json.dumps([frame.join_ref, frame.ref, frame.topic, frame.event, frame.payload])


def reply(request: Frame, status: str, response: Any) -> Frame:
    """The ``phx_reply`` to ``request``: same topic, ref and join_ref."""
    return Frame(
        topic=request.topic,
        event="phx_reply",
        payload={"status": status, "response": response},
        ref=request.ref,
        join_ref=request.join_ref,
    )
