"""/metrics: Prometheus text from the database's counters, loopback or bearer token only, and
exact across gunicorn worker processes."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter

import pytest

import mmoref_server as mm
from tests.support import GUNICORN_ACCESS_LOG
from tests.support import SERVER_ID
from tests.support import add_server
from tests.support import answering_workers
from tests.support import event_body
from tests.support import gunicorn_command
from tests.support import mint_tokens
from tests.support import one_per_sync_worker
from tests.support import raw_request
from tests.support import send_ok
from tests.support import signed_request

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

REMOTE = {"REMOTE_ADDR": "203.0.113.5"}


def samples(text: str) -> dict[str, float]:
    """Every sample line of an exposition, by its name and labels."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_metrics_count_events_rejections_clicks_and_latency(kit, client, store):
    token = kit.token("alice")
    send_ok(kit, "registered", token, "reg-1")
    send_ok(kit, "registered", token, "reg-1")             # a duplicate
    send_ok(kit, "qualified", token, "qual-1")
    assert kit.post(b"{not json").status_code == 400
    assert kit.post(kit.body("qualified", kit.token("bob"), "q"), secret="wrong").status_code == 401

    response = client.get("/metrics")

    assert response.status_code == 200 and response.mimetype == "text/plain"
    found = samples(response.get_data(as_text=True))
    server = 'server_id="srv_123"'
    assert found[f'mmoref_events_total{{{server},event="registered",outcome="advanced"}}'] == 1
    assert found[f'mmoref_events_total{{{server},event="registered",outcome="duplicate"}}'] == 1
    assert found[f'mmoref_events_total{{{server},event="qualified",outcome="advanced"}}'] == 1
    assert found['mmoref_rejections_total{status="400",error="body is not valid JSON",reason=""}'] == 1
    assert found['mmoref_rejections_total{status="401",error="bad_signature",reason="mac_mismatch"}'] == 1
    assert found[f"mmoref_share_link_clicks_total{{{server}}}"] == 2
    assert found["mmoref_ingest_latency_seconds_count"] == 5
    assert found['mmoref_ingest_latency_seconds_bucket{le="+Inf"}'] == 5
    assert 0 < found["mmoref_ingest_latency_seconds_sum"] < 5
    assert found["mmoref_database_bytes"] > 0
    assert abs(found["mmoref_last_event_timestamp_seconds"] - time.time()) < 60


def test_metrics_stay_exact_after_pruning_the_log(kit, client, clock, runner):
    send_ok(kit, "registered", kit.token("alice"), "reg-1")
    clock.t += 400 * 86400
    assert runner("prune", "--older-than", "180d").exit_code == 0
    found = samples(client.get("/metrics").get_data(as_text=True))
    assert found['mmoref_events_total{server_id="srv_123",event="registered",outcome="advanced"}'] == 1


def test_metrics_answer_loopback_only_unless_a_token_is_set(app, client):
    away = client.get("/metrics", environ_base=REMOTE)
    assert away.status_code == 404 and away.get_json()["error"] == "not found"
    proxied = client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.5"})
    assert proxied.status_code == 404 and "MMOREF_METRICS_TOKEN" in proxied.get_json()["hint"]

    app.config["MMOREF_METRICS_TOKEN"] = "s3cret-scrape"
    assert client.get("/metrics").status_code == 403
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"}, environ_base=REMOTE)
    assert wrong.status_code == 403 and wrong.get_json()["error"] == "forbidden"
    right = client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"}, environ_base=REMOTE)
    assert right.status_code == 200 and "mmoref_events_total" in right.get_data(as_text=True)


def test_metrics_token_setting_is_read_from_the_environment():
    assert mm.load_settings({"MMOREF_METRICS_TOKEN": "abc"})["MMOREF_METRICS_TOKEN"] == "abc"
    assert mm.load_settings({})["MMOREF_METRICS_TOKEN"] is None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gunicorn runs on POSIX only")
def test_metrics_sum_over_gunicorn_workers(live_server, store):
    pytest.importorskip("gunicorn")
    secret, workers, rounds = add_server(store), 4, 15
    tokens = mint_tokens(store, [f"code{i}" for i in range(workers * rounds)])
    server = live_server(command=gunicorn_command(*GUNICORN_ACCESS_LOG, workers=workers),
                         env={"PYTHONUNBUFFERED": "1"})
    log_start = len(server.output())
    for first in range(0, len(tokens), workers):   # each round: one event to every worker
        bodies = [event_body("registered", token, f"reg-{first + i}", referee=f"player-{first + i}")
                  for i, token in enumerate(tokens[first:first + workers])]
        answers = one_per_sync_worker(server.port, [signed_request(secret, body) for body in bodies])
        assert [(status, json.loads(text)["state"]) for status, text in answers] == [(200, "registered")] * workers
    served_by = Counter(pid for pid, _ in answering_workers(server, log_start, len(tokens), "POST"))
    assert sorted(served_by.values()) == [rounds] * workers

    log_start = len(server.output())
    reads = one_per_sync_worker(server.port, [raw_request("GET", "/metrics")] * workers)
    readers = {pid for pid, _ in answering_workers(server, log_start, workers, "GET")}
    assert len(readers) == workers   # each worker read the metrics once: each must see all N
    key = f'mmoref_events_total{{server_id="{SERVER_ID}",event="registered",outcome="advanced"}}'
    for status, text in reads:
        found = samples(text.decode())
        assert (status, found[key]) == (200, len(tokens))
        assert len(tokens) - workers <= found["mmoref_ingest_latency_seconds_count"] <= len(tokens)
    assert "Traceback" not in server.stop()
