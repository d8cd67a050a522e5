"""bench/phone.py: its delivery check, its corpus, and one short call through all its parts."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "phone.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_phone", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_phone"] = module
    spec.loader.exec_module(module)
    return module


phone = _bench()


def _item(message_id: str, text: bytes) -> dict[str, object]:
    return {"id": message_id, "size": len(text), "sha256": hashlib.sha256(text).hexdigest()}


def test_the_delivery_check_catches_missing_mangled_and_extra_messages(tmp_path: Path) -> None:
    """Only messages held once and byte-identical pass the bench's check and count as intact."""
    texts = [b"one", b"two", b"three"]
    sent = phone.write_outbox(tmp_path / "outbox", texts, "a")
    ids = [s.message_id for s in sent]
    assert phone.check_delivery(sent, [_item(i, t) for i, t in zip(ids, texts, strict=True)]) == []
    problems = phone.check_delivery(
        sent, [_item(ids[0], b"one"), _item(ids[1], b"twO"), _item("a9999", b"x")]
    )
    assert sorted(p.split(":")[0] for p in problems) == sorted([ids[1], "a9999", ids[2]])
    twice = phone.check_delivery(sent[:1], [_item(ids[0], b"one"), _item(ids[0], b"one")])
    assert twice == [f"{ids[0]}: stored 2 times"]
    good = [_item(i, t) for i, t in zip(ids, texts, strict=True)]
    assert phone.intact(sent, good) == 3
    assert phone.intact(sent, [*good[:2], _item(ids[2], b"thre")]) == 2
    assert phone.intact(sent, [*good, _item(ids[0], b"one")]) == 2


def test_the_outbox_holds_each_message_and_its_envelope(tmp_path: Path) -> None:
    """Each message is written as its text and a JSON envelope under a valid message id."""
    sent = phone.write_outbox(tmp_path / "outbox", [b"x" * 10], "b")
    assert (tmp_path / "outbox" / f"{sent[0].message_id}.text").read_bytes() == b"x" * 10
    envelope = json.loads((tmp_path / "outbox" / f"{sent[0].message_id}.json").read_text())
    assert envelope["to"] and envelope["from"].startswith("<")


def test_the_realistic_corpus_is_mail_and_reproducible() -> None:
    """The text corpus is the same for a seed, looks like mail, and carries some attachments."""
    corpus = phone.text_corpus(20, 4)
    assert corpus == phone.text_corpus(20, 4) and corpus != phone.text_corpus(20, 5)
    assert all(m.startswith(b"Received: ") and b"\r\nSubject:" in m for m in corpus)
    assert sum(b"Content-Transfer-Encoding: base64" in m for m in corpus) == 2


@pytest.mark.slow
def test_a_short_call_delivers_every_message_intact() -> None:
    """The bench's quick condition runs emulator, caller and answerer to a completed call."""
    finished = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=100
    )
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout.splitlines()[-1])
    assert result["condition"] == "quick" and "problems" not in result
    assert result["messages_intact"] == result["messages"] == 3
    assert result["outcomes"] == ["completed"]
    assert result["wire_bytes_a_to_b"] > result["payload_bytes"] > 0
    assert 0 < result["efficiency"] < 1
