"""Backup and prune at 1,000,000 delivery-log rows while a live server takes signed events.

    python bench/bench_operations.py [ROWS]

Builds the database with SQL in a temporary folder (nothing is kept), starts
`python mmoref_server.py serve`, posts signed events from 4 threads throughout, and prints
backup time and size, prune time, and how many acknowledged events are missing afterwards.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mmoref_server as mm  # noqa: E402
from tests.support import PYTHON  # noqa: E402
from tests.support import SERVER_SCRIPT  # noqa: E402
from tests.support import IngestLoad  # noqa: E402
from tests.support import LiveServer  # noqa: E402
from tests.support import add_server  # noqa: E402
from tests.support import mint_tokens  # noqa: E402

PAYLOAD = '{"event":"registered","token":"WyJz…","server_id":"srv_robust","server_event_id":"evt-%d",' \
          '"referee_identity":"player-%d@example.com","ts":1700000000}'


def build(db_path: str, rows: int) -> mm.Store:
    store = mm.open_store(db_path)
    old = mm.now() - 400 * 86400
    with store.transaction() as transaction:
        transaction.db.executemany(
            "INSERT INTO delivery_log (server_id, referral_id, token_referral_id, referrer_code, event,"
            " server_event_id, outcome, received_at, payload) VALUES ('srv_robust', ?, ?, 'code', 'registered',"
            " ?, 'advanced', ?, ?)",
            ((f"ref_{i}", f"ref_{i}", f"evt-{i}", old, PAYLOAD % (i, i)) for i in range(rows)))
    store.truncate_wal()
    return store


def cli(*args: str) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run([PYTHON, str(SERVER_SCRIPT), *args], capture_output=True, text=True, check=True)
    return time.monotonic() - started, done.stdout


def main(rows: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        db_path = f"{folder}/referrals.db"
        started = time.monotonic()
        store = build(db_path, rows)
        secret = add_server(store)
        tokens = mint_tokens(store, [f"c{i}" for i in range(3000)])
        print(f"built {rows:,} log rows in {time.monotonic() - started:.1f} s: {store.database_bytes():,} bytes")
        server = LiveServer(db_path, Path(folder))
        try:
            with IngestLoad(server.port, secret, tokens, seconds=600) as load:
                load.wait_for(50)
                before_backup = time.monotonic()
                seconds, _ = cli("backup", f"{folder}/copy.db", "--db", db_path)
                size = Path(f"{folder}/copy.db").stat().st_size
                print(f"backup while ingesting: {seconds:.1f} s, {size:,} bytes")
                copied = {row[0] for row in mm.sqlite3.connect(f"{folder}/copy.db").execute(
                    "SELECT token_referral_id FROM delivery_log WHERE server_event_id LIKE 'reg-%'")}
                acked = {mm.read_token(store.token_key, t).referral_id for t in load.acked_before(before_backup)}
                print(f"events acknowledged before the backup and missing from it: {len(acked - copied)}")
                seconds, out = cli("prune", "--older-than", "180d", "--db", db_path)
                print(f"prune while ingesting: {seconds:.1f} s\n  {out.strip()}")
                load.wait_for(len(tokens), seconds=300)
            latencies = sorted(latency for *_, latency in load.answers)
            ok = sum(1 for _, _, status, _ in load.answers if status == 200)
            print(f"ingest during both: {ok} of {len(tokens)} answered 200, slowest {latencies[-1]:.2f} s,"
                  f" p99 {latencies[int(len(latencies) * 0.99)]:.3f} s")
            kept = mm.sqlite3.connect(db_path).execute(
                "SELECT count(*) FROM delivery_log WHERE server_event_id LIKE 'reg-%'").fetchone()[0]
            print(f"events lost: {ok - kept}")
        finally:
            server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
