"""Envelopes and recipient states survive the spool's JSON round trip, and bad JSON is refused."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.address import parse_forward_path
from relay.envelope import (
    BodyType,
    Destination,
    Envelope,
    EnvelopeError,
    Recipient,
    RecipientState,
    RecipientStatus,
    Submitter,
)
from relay.reply import Reply, ReplyCode


def _envelope(**changes: object) -> Envelope:
    values: dict[str, object] = {
        "return_path": parse_forward_path("<Alice@Example.TEST>"),
        "recipients": (
            Recipient(parse_forward_path('<"b c"@example.test>'), Destination("local", "")),
            Recipient(
                parse_forward_path("<@hop.test:d@partner.test>"),
                Destination("smtp", "partner.test"),
                original="rfc822;d@partner.test",
            ),
            Recipient(parse_forward_path("<ü@example.test>", smtputf8=True)),
        ),
        "arrival": 1700000000.25,
        "submitter": Submitter("ESMTPSA", "127.0.0.1", None, "client.test", "alice", "TLSv1.3"),
        "body_type": BodyType.EIGHT_BIT_MIME,
        "smtputf8": True,
        "env_id": "abc123",
    }
    values.update(changes)
    return Envelope(**values)  # type: ignore[arg-type]


def test_envelope_round_trips_through_json() -> None:
    """An envelope written to JSON and read back is equal to the original."""
    envelope = _envelope()
    assert Envelope.from_dict(json.loads(json.dumps(envelope.to_dict()))) == envelope


def test_null_sender_round_trips() -> None:
    """The null reverse-path is stored as <> and read back as None."""
    envelope = _envelope(return_path=None)
    assert envelope.to_dict()["return_path"] == "<>"
    assert Envelope.from_dict(envelope.to_dict()).return_path is None
    assert envelope.sender_text == "<>"


def test_envelope_needs_a_recipient() -> None:
    """An envelope without recipients cannot be made."""
    with pytest.raises(ValueError):
        _envelope(recipients=())


@pytest.mark.parametrize(
    "status",
    [
        RecipientStatus(),
        RecipientStatus(
            RecipientState.DEFERRED,
            attempts=3,
            next_attempt=1700000600.0,
            last_reply=Reply(ReplyCode.LOCK, "locked", 450, "4.2.0"),
            warned=True,
            updated=1700000000.0,
        ),
        RecipientStatus(RecipientState.FAILED, 1, None, Reply(ReplyCode.USER)),
    ],
)
def test_status_round_trips_through_json(status: RecipientStatus) -> None:
    """A recipient status written to JSON and read back is equal to the original."""
    assert RecipientStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status


@pytest.mark.parametrize(
    "mutation,field",
    [
        (lambda d: d.pop("recipients"), "recipients"),
        (lambda d: d.update(arrival="soon"), "arrival"),
        (lambda d: d.update(smtputf8=1), "smtputf8"),
        (lambda d: d.update(body_type="9BIT"), "body_type"),
        (lambda d: d.update(return_path="<a@b\r\n>"), "return_path"),
        (lambda d: d["recipients"][0].update(address="nobody"), "recipient address"),
        (lambda d: d["recipients"][0].update(channel="a/b"), "destination"),
        (lambda d: d.update(recipients=[]), "envelope"),
        (lambda d: d["submitter"].pop("protocol"), "submitter.protocol"),
    ],
)
def test_bad_envelope_names_the_field(mutation: object, field: str) -> None:
    """A damaged envelope raises EnvelopeError whose message names the bad field."""
    data = _envelope().to_dict()
    mutation(data)  # type: ignore[operator]
    with pytest.raises(EnvelopeError, match=field):
        Envelope.from_dict(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)


@given(JSON)
def test_any_json_is_an_envelope_or_an_envelope_error(data: object) -> None:
    """Reading arbitrary JSON yields an envelope or EnvelopeError, never another exception."""
    with contextlib.suppress(EnvelopeError):
        Envelope.from_dict(data)  # type: ignore[arg-type]


class _Careful(dict):  # type: ignore[type-arg]
    """A dict that is not exactly a dict: from_dict reads it the field-by-field way."""


def _slow(value: object) -> object:
    """``value`` with every dict a :class:`_Careful` one."""
    if isinstance(value, dict):
        return _Careful({k: _slow(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_slow(v) for v in value]
    return value


def _outcome(data: object) -> object:
    try:
        return Envelope.from_dict(data)  # type: ignore[arg-type]
    except EnvelopeError as e:
        return str(e).replace("_Careful", "dict")


FIELDS = st.sampled_from(
    [
        *[("return_path",), ("recipients",), ("arrival",), ("submitter",), ("body_type",)],
        *[("smtputf8",), ("env_id",), ("recipients", 0), ("recipients", 1, "address")],
        *[("recipients", 1, "channel"), ("recipients", 1, "host"), ("recipients", 1, "original")],
        *[("submitter", "protocol"), ("submitter", "helo"), ("submitter", "tls")],
    ]
)


VALUES = JSON | st.sampled_from(["<a@b.test>", "local", "", "8BITMIME", 1.5, 7, True, 10**400])


def _change(data: dict[str, Any], field: tuple[Any, ...], value: object) -> None:
    """Set ``data[field...] = value`` if the way there still exists (an earlier change may
    have replaced a part of it)."""
    where: Any = data
    for key in field[:-1]:
        in_dict = isinstance(where, dict) and key in where
        in_list = isinstance(where, list) and isinstance(key, int) and key < len(where)
        if in_dict or in_list:
            where = where[key]
        else:
            return
    if isinstance(where, dict):
        where[field[-1]] = value


@given(st.lists(st.tuples(FIELDS, VALUES), min_size=1, max_size=2))
def test_the_quick_reading_agrees_with_the_careful_one(
    changes: list[tuple[tuple[Any, ...], object]],
) -> None:
    """One or two fields changed: both ways of reading give the same envelope or error."""
    data = json.loads(json.dumps(_envelope().to_dict()))
    for field, value in changes:
        _change(data, field, value)
    assert _outcome(data) == _outcome(_slow(data))


def test_a_bad_address_is_named_before_a_bad_channel() -> None:
    """Both wrong: either way of reading names the address first."""
    data = _envelope().to_dict()
    data["recipients"][0].update(address="not an address", channel="")
    with pytest.raises(EnvelopeError, match="recipient address"):
        Envelope.from_dict(data)
    with pytest.raises(EnvelopeError, match="recipient address"):
        Envelope.from_dict(_slow(data))  # type: ignore[arg-type]


def test_an_arrival_too_big_for_a_float_is_an_envelope_error() -> None:
    """A 400-digit arrival is refused with EnvelopeError, either way of reading."""
    data = _envelope().to_dict()
    data["arrival"] = 10**400
    for reading in (data, _slow(data)):
        with pytest.raises(EnvelopeError, match="arrival"):
            Envelope.from_dict(reading)  # type: ignore[arg-type]


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "state": st.sampled_from(["pending", "deferred", "x"]) | st.integers(),
            "attempts": st.integers() | st.text(),
            "next_attempt": st.floats(allow_nan=False) | st.text(),
            "reply": st.fixed_dictionaries(
                {"code": st.sampled_from(["USER", "NOPE"]), "text": st.text()},
                optional={"smtp": st.integers(), "enhanced": st.text()},
            ),
            "warned": st.booleans() | st.integers(),
        },
    )
)
def test_any_status_dict_is_a_status_or_an_envelope_error(data: dict[str, object]) -> None:
    """Reading arbitrary status dicts yields a status or EnvelopeError, never another exception."""
    with contextlib.suppress(EnvelopeError):
        RecipientStatus.from_dict(data)


def test_an_arrival_out_of_range_is_named_before_a_bad_submitter() -> None:
    """Both wrong: either way of reading names the arrival first (hypothesis found them apart)."""
    data = _envelope().to_dict()
    data["arrival"] = 10**400
    data["submitter"]["protocol"] = 1.5
    for reading in (data, _slow(data)):
        with pytest.raises(EnvelopeError, match="arrival"):
            Envelope.from_dict(reading)  # type: ignore[arg-type]
