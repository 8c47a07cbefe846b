"""docs/kits.md's senders, run the way an owner runs them (issue 21): each code block is taken from the
document and saved as the file it names, so the document is what is tested. Each sender must sign
every valid vector of docs/test-vectors.json, and get a dry run, a `registered` and its duplicate
through a live server.

PHP and Node.js are Debian's `php-cli` with `php-curl`, and `nodejs` (.ci/run installs them); without
them their tests skip locally and fail under CI=true.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import PYTHON
from tests.support import REFEREE
from tests.support import ROOT
from tests.support import SERVER_ID
from tests.support import add_server
from tests.support import log_rows_for
from tests.support import mint_tokens
from tests.support import referral_id_of
from tests.support import refused_port
from tests.support import required_program
from tests.support import rows
from tests.support import run_ok
from tests.support import signing_vectors
from tests.support import unavailable

KITS = ROOT / "docs" / "kits.md"
# `<!-- kit: FILE -->` right above a fenced block: the block is the sender saved as FILE
KIT_BLOCK = re.compile(r"^<!-- kit: (\S+) -->\n```\w*\n(.*?)^```$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Language:
    kit: str                     # the file docs/kits.md saves the sender as
    program: str                 # its interpreter, on PATH
    install: str                 # where the interpreter comes from
    sign_stdin: tuple[str, ...]  # options running code that loads the kit (its path follows) and prints, as a
                                 # JSON list, its header for each [secret, t, body] of the JSON list on stdin


LANGUAGES = {
    "php": Language("mmoref_send.php", "php", "Debian: apt-get install php-cli php-curl", (
        "-r", "require $argv[1]; $headers = [];"
              " foreach (json_decode(stream_get_contents(STDIN), true) as [$secret, $t, $body])"
              " { $headers[] = mmoref_signature($secret, $t, $body); }"
              " echo json_encode($headers);", "--")),
    "node": Language("mmoref_send.cjs", "node", "Debian: apt-get install nodejs", (
        "-e", "const kit = require(process.argv[1]);"
              " const vectors = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));"
              " const headers = vectors.map(([secret, t, body]) => kit.mmorefSignature(secret, t, body));"
              " console.log(JSON.stringify(headers));")),
    "python": Language("mmoref_send.py", "python", "", (
        "-c", "import json, runpy, sys; kit = runpy.run_path(sys.argv[1]);"
              " print(json.dumps([kit['mmoref_signature'](secret, t, body.encode())"
              " for secret, t, body in json.load(sys.stdin.buffer)]))")),
}


def kit_sources() -> dict[str, str]:
    """{file name: code} of every sender in docs/kits.md."""
    found = KIT_BLOCK.findall(KITS.read_text(encoding="utf-8"))
    assert len({name for name, _ in found}) == len(found), "two senders under one file name"
    return dict(found)


class Sender:
    """One sender of docs/kits.md, saved to its file in `folder` and run by its interpreter."""

    def __init__(self, language: Language, folder: Path):
        self.language = language
        self.interpreter = PYTHON if language.program == "python" else required_program(language.program,
                                                                                          language.install)
        if language.program == "php" and subprocess.run(
                [self.interpreter, "-r", "exit(extension_loaded('curl') ? 0 : 1);"], timeout=30).returncode != 0:
            unavailable(f"php's curl extension is not installed ({language.install})")
        self.path = folder / language.kit
        self.path.write_text(kit_sources()[language.kit], encoding="utf-8")

    def signatures(self, vectors: list[tuple[str, int, str]]) -> list[str]:
        """The kit's signature function, given each (secret, t, body)."""
        done = run_ok([self.interpreter, *self.language.sign_stdin, self.path], input=json.dumps(vectors),
                      encoding="utf-8", timeout=60)
        headers: list[str] = json.loads(done.stdout)
        return headers

    def send(self, *args: str, endpoint: str, secret: str) -> tuple[int, Any]:
        """Run the kit from a shell (`EVENT TOKEN SERVER_EVENT_ID [REFEREE_IDENTITY] [--test]`), configured
        through its environment variables: (exit status, the structure it printed)."""
        env = {**os.environ, "MMOREF_ENDPOINT": endpoint, "MMOREF_SERVER_ID": SERVER_ID, "MMOREF_SECRET": secret}
        done = subprocess.run([self.interpreter, str(self.path), *args], capture_output=True, encoding="utf-8",
                              env=env, timeout=60)
        assert done.stdout.strip(), f"{self.language.kit} printed nothing (exit {done.returncode}):\n{done.stderr}"
        return done.returncode, json.loads(done.stdout)


@pytest.fixture(params=list(LANGUAGES))
def sender(request: pytest.FixtureRequest, tmp_path: Path) -> Sender:
    return Sender(LANGUAGES[request.param], tmp_path)


def test_kits_md_holds_one_sender_per_language() -> None:
    assert sorted(kit_sources()) == sorted(language.kit for language in LANGUAGES.values())


def test_the_sender_signs_every_valid_vector(sender: Sender) -> None:
    valid = signing_vectors()["valid"]
    signed = sender.signatures([(entry["secret"], entry["t"], entry["body"]) for entry in valid])
    assert signed == [entry["header"] for entry in valid]


@pytest.mark.slow
def test_the_sender_gets_a_dry_run_a_registered_and_its_duplicate_through_a_live_server(
        sender: Sender, db_path: str, live_server: Any) -> None:
    store = mm.open_store(db_path)
    secret = add_server(store)
    [token] = mint_tokens(store, ["alice"])
    referral_id = referral_id_of(store, token)
    store.close()
    endpoint = live_server().url + INGEST

    def sent(*args: str, secret: str = secret) -> tuple[int, Any]:
        return sender.send(*args, endpoint=endpoint, secret=secret)

    assert sent("registered", token, "reg-1", REFEREE, "--test") == \
        (0, {"status": 200, "body": {"ok": True, "test": True}, "error": None})
    assert log_rows_for(db_path, referral_id, "registered", "reg-1") == 0   # a dry run writes nothing
    assert sent("registered", token, "reg-1", REFEREE) == \
        (0, {"status": 200, "body": {"ok": True, "referral_id": referral_id, "state": "registered"}, "error": None})
    assert sent("registered", token, "reg-1", REFEREE) == \
        (0, {"status": 200, "body": {"ok": True, "duplicate": True}, "error": None})
    assert log_rows_for(db_path, referral_id, "registered", "reg-1") == 1
    [(payload,)] = rows(db_path, "SELECT payload FROM delivery_log WHERE token_referral_id = ?", referral_id)
    assert sorted(json.loads(payload)) == ["event", "referee_identity", "server_event_id", "server_id", "token", "ts"]

    # a refusal is passed on as the server gave it, and the exit status says so
    status, result = sent("qualified", token, "qual-1", secret="mmsk_" + "0" * 43)
    assert status == 1
    assert (result["status"], result["body"]["error"], result["body"]["reason"]) == (401, "bad_signature",
                                                                                      "mac_mismatch")


def test_the_sender_reports_an_unreachable_server(sender: Sender) -> None:
    with refused_port() as port:
        endpoint = f"http://127.0.0.1:{port}{INGEST}"
        status, result = sender.send("registered", "any-token", "reg-1", REFEREE, endpoint=endpoint, secret="s")
    assert status == 1
    assert (result["status"], result["body"]) == (None, None)
    assert result["error"].startswith(f"cannot reach {endpoint}: "), result
