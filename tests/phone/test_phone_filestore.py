"""The file-backed phone store: durable ids, resumable partial text, batched fsyncs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from relay.errors import DigestMismatch
from relay.interfaces import IPhoneStore
from relay.phone import filestore
from relay.phone.filestore import FilePhoneStore
from relay.reply import Reply, ReplyCode
from relay.sansio.phone.session import ALREADY_HAVE, NOT_HELD_FOR

from support.phone.session_harness import HUB, envelope


def _store(root: Path) -> FilePhoneStore:
    return FilePhoneStore(root, reactor)


def test_the_file_store_provides_the_store_interface(tmp_path: Path) -> None:
    """FilePhoneStore is an IPhoneStore."""
    assert verifyObject(IPhoneStore, _store(tmp_path))


@pytest_twisted.ensureDeferred
async def test_outgoing_lists_what_was_queued_with_size_and_digest(tmp_path: Path) -> None:
    """Queued mail is offered oldest first, with its size, SHA-256, and its text readable."""
    store = _store(tmp_path)
    await store.put_outgoing("site-b", "m2", envelope(), b"second")
    await store.put_outgoing("site-b", "m1", envelope(), b"first text")
    found = await store.outgoing("site-b")
    assert [m.message_id for m in found] == ["m1", "m2"]  # same arrival: by id
    assert found[0].size == 10 and found[0].digest == hashlib.sha256(b"first text").digest()
    assert await store.read_text("site-b", "m1", 6, 100) == b"text"
    assert await store.outgoing("nobody") == []


@pytest_twisted.ensureDeferred
async def test_a_committed_id_is_remembered_across_restarts(tmp_path: Path) -> None:
    """After a commit, the same id is answered "already have it", also by a new store."""
    store = _store(tmp_path)
    env = envelope()
    first = await store.accept(HUB, "m1", env, 5)
    assert first.whole is None and first.offset == 0 and first.replies[0].code is ReplyCode.AOK
    await store.write_text(HUB, "m1", 0, b"hel")
    await store.write_text(HUB, "m1", 3, b"lo")
    queue_id = await store.commit(HUB, "m1", env, 5, hashlib.sha256(b"hello").digest())
    assert queue_id == f"{HUB}/m1"
    assert (await store.accept(HUB, "m1", env, 5)).whole == ALREADY_HAVE
    again = _store(tmp_path)
    assert (await again.accept(HUB, "m1", env, 5)).whole == ALREADY_HAVE
    assert again.received(HUB)["m1"][1] == b"hello"


@pytest_twisted.ensureDeferred
async def test_a_re_proposal_is_answered_per_recipient_from_the_committed_envelope(
    tmp_path: Path,
) -> None:
    """A committed id proposed again for more recipients than it was stored for: those it
    was stored for are "already have it", the other is not taken as done."""
    store = _store(tmp_path)
    env = envelope("<bob@site.example>")
    await store.accept(HUB, "m1", env, 2)
    await store.write_text(HUB, "m1", 0, b"hi")
    await store.commit(HUB, "m1", env, 2, hashlib.sha256(b"hi").digest())
    wider = envelope("<carol@site.example>", "<bob@site.example>")
    answer = await _store(tmp_path).accept(HUB, "m1", wider, 2)
    assert answer.whole is None and answer.replies == (NOT_HELD_FOR, ALREADY_HAVE)
    assert not answer.replies[0].code.is_success


@pytest_twisted.ensureDeferred
async def test_a_partial_text_is_resumed_from_what_is_held(tmp_path: Path) -> None:
    """Text stored before a drop is named as the offset on the next proposal."""
    store = _store(tmp_path)
    await store.write_text(HUB, "big", 0, b"x" * 1000)
    acceptance = await _store(tmp_path).accept(HUB, "big", envelope(), 5000)
    assert acceptance.offset == 1000
    await store.write_text(HUB, "big", 1000, b"y" * 4000)
    digest = hashlib.sha256(b"x" * 1000 + b"y" * 4000).digest()
    await store.commit(HUB, "big", envelope(), 5000, digest)
    assert store.received(HUB)["big"][1] == b"x" * 1000 + b"y" * 4000


@pytest_twisted.ensureDeferred
async def test_a_text_that_fails_its_hash_is_dropped_and_sent_again(tmp_path: Path) -> None:
    """A digest mismatch fails the commit and forgets the partial, so it restarts at 0."""
    store = _store(tmp_path)
    await store.write_text(HUB, "m1", 0, b"damaged")
    with pytest.raises(DigestMismatch):
        await store.commit(HUB, "m1", envelope(), 7, hashlib.sha256(b"correct").digest())
    acceptance = await store.accept(HUB, "m1", envelope(), 7)
    assert acceptance.offset == 0 and acceptance.whole is None
    assert store.received(HUB) == {}


@pytest_twisted.ensureDeferred
async def test_settling_keeps_only_the_recipients_to_try_again(tmp_path: Path) -> None:
    """Delivered and bounced recipients are done; temporarily failed ones stay queued."""
    store = _store(tmp_path)
    env = envelope("<a@site.example>", "<b@site.example>", "<c@site.example>")
    await store.put_outgoing("site-b", "m1", env, b"text")
    await store.settle(
        "site-b", "m1", [Reply(ReplyCode.OK), Reply(ReplyCode.AGN), Reply(ReplyCode.USER)]
    )
    (left,) = await store.outgoing("site-b")
    assert [str(r.address) for r in left.envelope.recipients] == ["b@site.example"]
    await store.settle("site-b", "m1", [Reply(ReplyCode.OK)])
    assert store.pending("site-b") == []


@pytest_twisted.ensureDeferred
async def test_commits_that_arrive_together_share_directory_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty commits asked at once cost far fewer directory fsyncs than twenty each."""
    synced: list[Path] = []
    real = filestore.fsync_directory

    def counting(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(filestore, "fsync_directory", counting)
    store = _store(tmp_path)
    texts = {f"m{i}": b"text %d" % i for i in range(20)}
    await gatherResults([store.write_text(HUB, m, 0, t) for m, t in texts.items()])
    synced.clear()
    await gatherResults(
        [
            store.commit(HUB, m, envelope(), len(t), hashlib.sha256(t).digest())
            for m, t in texts.items()
        ]
    )
    assert {m: t for m, (_, t) in store.received(HUB).items()} == texts
    assert len(synced) <= 8


@pytest_twisted.ensureDeferred
async def test_remembered_ids_are_forgotten_after_their_time(tmp_path: Path) -> None:
    """``forget(before)`` drops the ids committed before that time and the partial texts
    untouched since, keeps newer ones, and never drops a committed text still waiting to
    be taken (the relay's recovery needs it)."""
    store = _store(tmp_path)
    text = b"remembered text"
    digest = hashlib.sha256(text).digest()
    for message_id in ("old", "new", "waiting"):
        await store.accept(HUB, message_id, envelope(), len(text))
        await store.write_text(HUB, message_id, 0, text)
        await store.commit(HUB, message_id, envelope(), len(text), digest)
    await store.write_text(HUB, "cut-old", 0, b"part")
    await store.write_text(HUB, "cut-new", 0, b"part")
    mail = tmp_path / HUB / "in" / "mail"
    partial = tmp_path / HUB / "in" / "partial"
    for taken in ("old", "new"):
        (mail / f"{taken}.text").unlink()  # stored in the queue: only the id is left
    for path in (mail / "old.env", mail / "waiting.env", partial / "cut-old"):
        os.utime(path, (1000.0, 1000.0))
    forgotten = await store.forget(2000.0)
    assert forgotten == 1
    assert sorted(p.name for p in mail.iterdir()) == [
        "new.env",
        "waiting.env",
        "waiting.text",
    ]
    assert [p.name for p in partial.iterdir()] == ["cut-new"]
    fresh = await store.accept(HUB, "old", envelope(), len(text))
    assert fresh.whole is None and fresh.offset == 0
    held = await store.accept(HUB, "new", envelope(), len(text))
    assert held.whole == ALREADY_HAVE
