"""Ingest benchmark: one command, the figures of docs/performance.md.

    python bench/bench_ingest.py                               # full run (1,000,000 prefilled rows)
    python bench/bench_ingest.py --rows 100000                 # quicker
    python bench/bench_ingest.py --baseline ../other-checkout  # also against another version, at 1, 8, 16 connections
    python bench/bench_ingest.py --start-postgres --nodes 1,2,4   # several nodes on a throwaway PostgreSQL

Every comparison runs its contenders in alternating rounds in one run (wrk when installed, else
a keep-alive Python client), and prints medians: rate, p50/p99, and the server's CPU per request
from /proc, user and system apart (steadier than rates on a shared machine), each over the first
contender's, round by round. In one run it compares, on SQLite with synchronous=FULL:
1. a no-op JSON route (bench/noop_server.py: `create_app()` plus that route, the same waitress
   options), signed unique `registered` events on `python mmoref_server.py serve`, and
   `GET /healthz` on the same server; then ingest over one connection (latency);
2. ingest at 1, 8 and 16 connections, with --baseline after the same ingest on other checkouts
   (other designs);
3. the default server against `gunicorn -w 2`, sync and gthread;
4. a database prefilled with --rows delivery-log rows against an empty one; dashboard pages
   (server time from Server-Timing), a CSV export and peak RSS on the big one.

With --db postgresql://... (or --start-postgres) it instead compares signed unique `registered`
events/s with 1, 2, 4 (--nodes) mmoref processes sharing that PostgreSQL and a single process on
SQLite, each next to /healthz on the same processes. Each figure gets a fresh database, created
beside the one the URL names (the role needs CREATEDB) and dropped afterwards; --start-postgres
runs initdb/pg_ctl from Debian's packages, fsync on.

Only 127.0.0.1; every load loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Union

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import mmoref_server as mm  # noqa: E402

SERVER_ID, GAME, PASSWORD = "bench", "benchgame", "bench-password-123"
CODES = 100  # referrer codes: a prefill of 1,000,000 rows gives 10,000 per code (the CSV export)
HOST = "127.0.0.1"


# The servers under test ######################################################

GUNICORN = {"gunicorn -w 2": ["-w", "2"],
            "gunicorn -w 2 -k gthread --threads 4": ["-w", "2", "-k", "gthread", "--threads", "4"]}
NOOP_SERVER = ROOT / "bench" / "noop_server.py"


class Server:
    """`python mmoref_server.py serve` (from `checkout`: another version to compare with), the
    bench's no-op server (`noop`), or gunicorn with `gunicorn` options; waitress `threads`."""

    def __init__(self, db_path: Path | str, threads: int = 0, gunicorn: list[str] | None = None,
                 log_path: Path | None = None, checkout: Path = ROOT, noop: bool = False):
        self.port, self.db_path = _free_port(), db_path
        self.log = open(log_path or Path(db_path).with_suffix(".log"), "a")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "MMOREF_ADMIN_PASSWORD": PASSWORD, "MMOREF_DB": str(db_path)}
        if threads:
            env["MMOREF_THREADS"] = str(threads)
        command = [sys.executable, str(checkout / "mmoref_server.py"), "serve", "--port", str(self.port)]
        if noop:
            command = [sys.executable, str(NOOP_SERVER), str(self.port)]
        if gunicorn:
            command = [sys.executable, "-m", "gunicorn", *gunicorn, "-b", f"{HOST}:{self.port}",
                       "mmoref_server:create_app()"]
        self.process = subprocess.Popen(command, env=env, cwd=checkout, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if request("GET", self.port, "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the server did not start; see " + self.log.name)

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU time of the server process and its worker processes, from /proc."""
        user = system = 0.0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            with contextlib.suppress(FileNotFoundError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                user += int(fields[11]) / os.sysconf("SC_CLK_TCK")
                system += int(fields[12]) / os.sysconf("SC_CLK_TCK")
        return user, system

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found.extend(int(child) for child in task.read_text().split())
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def request(method: str, port: int, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, connection: http.client.HTTPConnection | None = None):
    conn = connection or http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    if connection is None:
        conn.close()
    return response.status, data, response


# Tokens ######################################################################

def mint_tokens(db_path: Path | str, count: int, module: Any = mm) -> list[str]:
    """Record `count` clicks and mint their tokens with the server's own storage code (`module`: the
    mmoref_server under test), in one transaction (the share link's per-client limit is 30 a minute)."""
    store = open_store(module, str(db_path))
    issued = module.now()
    with store.transaction() as transaction:
        referral_ids = [transaction.insert_referral(SERVER_ID, f"c{n % CODES}", issued) for n in range(count)]
    tokens = [module.mint_token(store.token_key, SERVER_ID, referral_id, issued) for referral_id in referral_ids]
    store.close()
    return tokens


def open_store(module: Any, location: str) -> Any:
    """`module`'s store for `location` (a checkout older than open_store() opens it with Store())."""
    return module.open_store(location) if hasattr(module, "open_store") else module.Store(location)


def load_checkout(checkout: Path, name: str) -> Any:
    """The mmoref_server module of another checkout (a version to compare with), as module `name`."""
    spec = importlib.util.spec_from_file_location(name, checkout / "mmoref_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Load generators ##############################################################

WRK_SCRIPT = """
local bodies = {%(bodies)s}
local signatures = {%(signatures)s}
local index, step, sent, limit = 1, 1, 0, %(limit)d
function setup(thread) thread:set("id", __next_id or 0); __next_id = (__next_id or 0) + 1 end
function init(args) index = (id or 0) + 1; step = tonumber(args[1]) end
function request()
  sent = sent + 1
  if #bodies == 0 then
    if sent > limit then wrk.thread:stop() end
    return wrk.format("GET", "%(path)s")
  end
  if index > #bodies then wrk.thread:stop(); index = #bodies end
  local body, signature = bodies[index], signatures[index]
  index = index + step
  return wrk.format("POST", "/api/referral/events",
                    {["X-MMOLove-Signature"] = signature, ["Content-Type"] = "application/json"}, body)
end
function done(summary, latency, requests)
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%f, "bad_status": %%d, "socket_errors": %%d, ' ..
    '"p50_ms": %%f, "p99_ms": %%f}\\n', summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""
Work = Union[str, list[tuple[bytes, str]]]  # a path to GET, or signed events to POST once each


def signed_events(tokens: list[str], secret: str, label: str) -> list[tuple[bytes, str]]:
    events = []
    for n, token in enumerate(tokens):
        body = mm.build_body("registered", token, SERVER_ID, f"{label}-{n}", referee_identity=f"{label}-player-{n}")
        events.append((body, mm.signature_header(secret, body)))
    return events


def run_wrk(port: int, work: Work, seconds: float, connections: int, workdir: Path, limit: int = 200_000) -> dict:
    threads = min(2, connections)
    events = [] if isinstance(work, str) else work
    script = workdir / "load.lua"
    script.write_text(WRK_SCRIPT % {
        "bodies": ",".join(json.dumps(body.decode()) for body, _ in events),
        "signatures": ",".join(json.dumps(signature) for _, signature in events),
        "path": work if isinstance(work, str) else "", "limit": limit // threads})
    path = work if isinstance(work, str) else "/api/referral/events"
    output = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "--latency",
         "-s", str(script), f"http://{HOST}:{port}{path}", "--", str(threads)],
        capture_output=True, text=True, timeout=seconds + 60)
    if "RESULT " not in output.stdout:
        raise SystemExit(f"wrk failed:\n{output.stdout}\n{output.stderr}")
    result = json.loads(output.stdout.split("RESULT ", 1)[1])
    result["rate"] = result["requests"] / result["seconds"]
    return result


def run_python_client(port: int, work: Work, seconds: float, connections: int, workdir: Path,
                      limit: int = 200_000) -> dict:
    """The fallback without wrk: keep-alive connections on threads, bounded by count and time."""
    latencies: list[float] = []
    bad = [0]
    lock = threading.Lock()
    pending = None if isinstance(work, str) else iter(work)
    deadline = time.monotonic() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        mine = []
        for _ in range(limit // connections):
            if time.monotonic() > deadline:
                break
            if pending is None:
                method, path, body, headers = "GET", str(work), None, {}
            else:
                with lock:
                    item = next(pending, None)
                if item is None:
                    break
                method, path, body, headers = "POST", "/api/referral/events", item[0], {mm.SIGNATURE_HEADER: item[1]}
            started = time.perf_counter()
            status, _, _ = request(method, port, path, body, headers, connection=conn)
            mine.append(time.perf_counter() - started)
            if status != 200:
                bad[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(seconds + 60)
    elapsed = time.monotonic() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0  # noqa: E731
    return {"requests": len(latencies), "seconds": elapsed, "bad_status": bad[0], "socket_errors": 0,
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "rate": len(latencies) / elapsed}


# Measuring: contenders in alternating rounds #################################

@dataclass
class Contender:
    """One row of a comparison: a server and what to send it (`path`: GET it; else signed events)."""
    server: Server
    path: str | None = None
    secret: str = ""
    module: Any = mm  # the mmoref_server that mints this server's tokens
    refusals_allowed: bool = False  # gunicorn on one SQLite file may answer 503 "database busy"

    def work(self, args: argparse.Namespace, label: str) -> Work:
        if self.path:
            return self.path
        return signed_events(mint_tokens(self.server.db_path, args.events, self.module), self.secret, label)


def alternate(contenders: dict[str, Contender], args: argparse.Namespace, workdir: Path,
              connections: int | None = None, rounds: int | None = None) -> dict[str, dict]:
    """Each round runs every contender once, in turn; each gets the medians of its rounds, and
    `vs_first`/`cpu_vs_first`: the medians of its rate and CPU per request over the first's, round
    by round (a neighbour's load then slows both alike). CPU comes from /proc, user and system apart."""
    load = run_wrk if shutil.which("wrk") and not args.python_client else run_python_client
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for number in range(rounds or args.rounds):
        for name, contender in contenders.items():
            work = contender.work(args, f"r{number}{len(runs[name])}{abs(hash(name)) % 10**6}")
            before = contender.server.cpu_seconds()
            result = load(contender.server.port, work, args.seconds, connections or args.connections, workdir)
            after = contender.server.cpu_seconds()
            requests = max(1, result["requests"])
            result["user_us"], result["system_us"] = ((b - a) * 1e6 / requests for a, b in zip(before, after))
            result["cpu_us"] = result["user_us"] + result["system_us"]
            if result["socket_errors"] or (result["bad_status"] and not contender.refusals_allowed):
                raise SystemExit(f"{name}: a round failed: {result}")
            runs[name].append(result)
    first = runs[next(iter(runs))]
    summary = {}
    for name, rounds_run in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in rounds_run)
                         for key in ("rate", "p50_ms", "p99_ms", "requests", "user_us", "system_us", "cpu_us")}
        summary[name]["vs_first"] = statistics.median(r["rate"] / f["rate"] for r, f in zip(rounds_run, first))
        summary[name]["cpu_vs_first"] = statistics.median(r["cpu_us"] / f["cpu_us"] for r, f in zip(rounds_run, first))
        summary[name]["not_200"] = sum(r["bad_status"] for r in rounds_run)
    return summary


def measure_nodes(servers: list[Server], db: str, secret: str, args: argparse.Namespace, workdir: Path,
                  label: str) -> dict:
    """Like `alternate`, the load split evenly over several servers on one database: summed
    rates, the worst server's p50 and p99."""
    load = run_wrk if shutil.which("wrk") and not args.python_client else run_python_client
    ports = [server.port for server in servers]
    connections = max(1, args.connections // len(ports))

    def spread(work: Work) -> dict:
        def one(index: int) -> dict:
            folder = workdir / f"node{index}"
            folder.mkdir(exist_ok=True)
            share = work if isinstance(work, str) else work[index::len(ports)]
            return load(ports[index], share, args.seconds, connections, folder)

        with ThreadPoolExecutor(len(ports)) as pool:
            results = list(pool.map(one, range(len(ports))))
        if not isinstance(work, str) and any(r["bad_status"] or r["socket_errors"] for r in results):
            raise SystemExit(f"an ingest round failed: {results}")
        return {"rate": sum(r["rate"] for r in results), "requests": sum(r["requests"] for r in results),
                "p50_ms": max(r["p50_ms"] for r in results), "p99_ms": max(r["p99_ms"] for r in results)}

    ingest_rounds, health_rounds = [], []
    for round_number in range(args.rounds):
        events = signed_events(mint_tokens(db, args.events), secret, f"{label}{round_number}")
        ingest_rounds.append(spread(events))
        health_rounds.append(spread("/healthz"))
    return {"ingest": _median_round(ingest_rounds), "healthz": _median_round(health_rounds)}


def fresh_postgres_database(url: str, name: str) -> str:
    """A new, empty database beside the one `url` names (dropped first if a previous run left it)."""
    import psycopg

    parts = urllib.parse.urlsplit(url)
    database = f"{parts.path.lstrip('/') or 'postgres'}_bench_{name}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        admin.execute(f'CREATE DATABASE "{database}"')
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


def drop_postgres_database(admin_url: str, url: str) -> None:
    import psycopg

    database = urllib.parse.urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def compare_engines(args: argparse.Namespace, url: str, workdir: Path) -> list[dict]:
    """Single-process SQLite, then 1, 2, 4 (--nodes) processes on one PostgreSQL: one row each."""
    table = []
    for engine, nodes in [("sqlite", 1)] + [("postgresql", n) for n in args.nodes]:
        db = str(workdir / "compare.db") if engine == "sqlite" else fresh_postgres_database(url, f"n{nodes}")
        store = mm.open_store(db)
        secret, _ = store.add_server(SERVER_ID, GAME, "Bench", "http://localhost:8080/register")
        store.close()
        servers = [Server(db, args.threads, log_path=workdir / f"{engine}-{nodes}-{i}.log") for i in range(nodes)]
        try:
            measured = measure_nodes(servers, db, secret, args, workdir, f"{engine}{nodes}-")
        finally:
            for server in servers:
                server.stop()
        if engine == "postgresql":
            drop_postgres_database(url, db)
        table.append({"engine": engine, "nodes": nodes, **measured})
        _report_nodes_row(table[-1])
    return table


def _report_nodes_row(row: dict) -> None:
    ingest, health = row["ingest"], row["healthz"]
    print(f"{row['engine']:<10} {row['nodes']} node(s)  ingest {ingest['rate']:7.0f} events/s  {_latency(ingest)}"
          f"  healthz {health['rate']:7.0f} req/s  ratio {ingest['rate'] / health['rate']:.2f}", flush=True)


def _median_round(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in ("rate", "p50_ms", "p99_ms", "requests")}


def fresh_database(workdir: Path, name: str, module: Any = mm) -> tuple[Path, str]:
    db_path = workdir / name
    store = open_store(module, str(db_path))
    secret, _ = store.add_server(SERVER_ID, GAME, "Bench", "http://localhost:8080/register")
    store.close()
    return db_path, secret


def prefill(db_path: Path, rows: int) -> tuple[str, float]:
    """Write `rows` registered events through the server's own storage and transition code."""
    store = mm.open_store(str(db_path))
    secret, _ = store.add_server(SERVER_ID, GAME, "Bench", "http://localhost:8080/register")
    ttl = mm.SETTINGS["MMOREF_TOKEN_TTL"][1]
    started = time.perf_counter()
    for start in range(0, rows, 10_000):
        with store.transaction() as transaction:
            for n in range(start, min(rows, start + 10_000)):
                issued = mm.now()
                referral_id = transaction.insert_referral(SERVER_ID, f"c{n % CODES}", issued)
                body = mm.build_body("registered", "prefilled", SERVER_ID, f"pre-{n}", referee_identity=f"pre-{n}",
                                     ts=issued)
                delivery = mm.Delivery(SERVER_ID, "registered", mm.TokenClaims(SERVER_ID, referral_id, issued),
                                       f"pre-{n}", f"pre-{n}", issued, mm._scrubbed_snippet(body, [secret], 2000))
                mm.apply_event(transaction, delivery, ttl)  # the transition code the server runs
    store.close()
    return secret, time.perf_counter() - started


class Dashboard:
    """A logged-in keep-alive session for timing pages."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=120)
        self.cookies: dict[str, str] = {}
        page = self.get("/dashboard/login")[1]
        self.post("/dashboard/login", {"password": PASSWORD, "csrf_token": _csrf(page)})

    def _send(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, str, float, float]:
        started = time.perf_counter()
        cookie = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
        self.conn.request(method, path, body=body, headers={**headers, "Cookie": cookie})
        response = self.conn.getresponse()
        text = response.read().decode()
        wall = (time.perf_counter() - started) * 1000
        for set_cookie in response.msg.get_all("Set-Cookie") or []:
            name, value = set_cookie.split(";", 1)[0].split("=", 1)
            self.cookies[name] = value
        timing = re.search(r"dur=([\d.]+)", response.getheader("Server-Timing", "") or "")
        return response.status, text, float(timing.group(1)) if timing else wall, wall

    def get(self, path: str):
        return self._send("GET", path, None, {})

    def post(self, path: str, form: dict):
        body = urllib.parse.urlencode(form).encode()
        return self._send("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})


def _csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def time_pages(port: int) -> dict:
    dash = Dashboard(port)
    tab = f"/dashboard/{GAME}/{SERVER_ID}/referrals"
    best = lambda path: min(dash.get(path)[2] for _ in range(5))  # noqa: E731
    first = best(tab)
    path, deep_times = tab, []
    for _ in range(50):  # follow "older" 50 pages deep (2,500 rows back)
        status, page, server_ms, _ = dash.get(path)
        deep_times.append(server_ms)
        older = re.search(r'id="older" href="([^"]+)"', page)
        if status != 200 or not older:
            break
        path = older.group(1).replace("&amp;", "&")
    filtered = best(f"{tab}?event=registered&outcome=advanced&q=c7")
    search = best(f"{tab}?q=pre-4242")
    csv_started = time.perf_counter()
    status, text, _, _ = dash.get(f"{tab}/log.csv?q=c7")
    csv_ms = (time.perf_counter() - csv_started) * 1000
    return {"tab_first_page_ms": first, "deep_page_ms": deep_times[-1], "deep_pages_max_ms": max(deep_times),
            "deep_pages_followed": len(deep_times), "filtered_page_ms": filtered, "search_page_ms": search,
            "csv_ms": csv_ms, "csv_rows": text.count("\n") - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="prefilled delivery-log rows (0: skip)")
    parser.add_argument("--seconds", type=int, default=4, help="length of each load round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=8000, help="unique events minted per ingest round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="waitress threads (0: the server's default)")
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="a checkout of another mmoref version (an alternative design) to compare ingest with"
                             " at 1, 8 and 16 connections; may be given more than once")
    parser.add_argument("--python-client", action="store_true", help="don't use wrk even if installed")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--db", help="postgresql:// URL: compare nodes on it with single-process SQLite")
    parser.add_argument("--start-postgres", action="store_true", help="like --db, on a throwaway local cluster")
    parser.add_argument("--nodes", type=lambda raw: [int(n) for n in raw.split(",")], default=[1, 2, 4],
                        help="mmoref processes on PostgreSQL, e.g. 1,2,4")
    args = parser.parse_args()
    results: dict = {"client": "wrk" if shutil.which("wrk") and not args.python_client else "python",
                     "cpus": os.cpu_count(), "python": sys.version.split()[0], "sqlite": mm.sqlite3.sqlite_version}
    print(f"client: {results['client']}, {results['cpus']} CPUs, Python {results['python']},"
          f" SQLite {results['sqlite']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mmoref-bench-") as tmp:
        if args.db or args.start_postgres:
            results["engines"] = postgres_stage(args, Path(tmp))
        else:
            sqlite_stages(args, Path(tmp), results)
    if args.json:
        print(json.dumps(results, indent=2))


def postgres_stage(args: argparse.Namespace, workdir: Path) -> list[dict]:
    cluster = None
    if args.start_postgres:
        from tests.support import POSTGRES_MISSING
        from tests.support import PostgresCluster
        from tests.support import postgres_bin

        if postgres_bin() is None:
            raise SystemExit(POSTGRES_MISSING)
        cluster = PostgresCluster(postgres_bin(), durable=True)
    try:
        return compare_engines(args, args.db or cluster.url(), workdir)
    finally:
        if cluster:
            cluster.stop()


class Servers(contextlib.ExitStack):
    """Servers started for one stage, all stopped when it ends."""

    def start(self, *args: Any, **kwargs: Any) -> Server:
        server = Server(*args, **kwargs)
        self.callback(server.stop)
        return server


def sqlite_stages(args: argparse.Namespace, workdir: Path, results: dict) -> None:
    with Servers() as servers:  # 1. ingest and healthz against a no-op route on the same app
        db_path, secret = fresh_database(workdir, "empty.db")
        product = servers.start(db_path, args.threads)
        noop = servers.start(workdir / "noop.db", args.threads, noop=True)
        results["headline"] = alternate({"no-op route": Contender(noop, "/noop"),
                                         "ingest": Contender(product, secret=secret),
                                         "healthz": Contender(product, "/healthz")}, args, workdir)
        _report_table("the default server, alternating rounds", results["headline"], "no-op")
        results["one_connection"] = alternate({"ingest, 1 connection": Contender(product, secret=secret)},
                                              args, workdir, connections=1)
        _report_table("one connection", results["one_connection"], None)
        results["empty_peak_rss_mb"] = product.peak_rss_mb()
    results["connections"] = connections_stage(args, workdir)
    results["gunicorn"] = gunicorn_stage(args, workdir)
    if args.rows:
        results["big"] = big_database_stage(args, workdir)


def connections_stage(args: argparse.Namespace, workdir: Path) -> dict:
    """This checkout's ingest at 1, 8 and 16 connections, after other versions' (--baseline) when given."""
    table: dict[int, dict] = {}
    with Servers() as servers:
        contenders = {}
        for number, checkout in enumerate(path.resolve() for path in args.baseline):
            module = load_checkout(checkout, f"mmoref_baseline_{number}")
            db_path, secret = fresh_database(workdir, f"baseline-{number}.db", module)
            contenders[str(checkout)] = Contender(servers.start(db_path, args.threads, checkout=checkout),
                                                  secret=secret, module=module)
        db_path, secret = fresh_database(workdir, "this.db")
        contenders["this checkout"] = Contender(servers.start(db_path, args.threads), secret=secret)
        for connections in (1, 8, 16):
            table[connections] = alternate(contenders, args, workdir, connections=connections)
            _report_table(f"ingest, {connections} connection(s)", table[connections],
                          "the first" if args.baseline else None)
    return table


def gunicorn_stage(args: argparse.Namespace, workdir: Path) -> dict:
    """The default server against gunicorn -w 2, sync and gthread, each on its own database."""
    if not importlib.util.find_spec("gunicorn"):
        print("gunicorn is not installed: no gunicorn rows", flush=True)
        return {}
    with Servers() as servers:
        contenders = {}
        for name, options in {"waitress (serve)": None, **GUNICORN}.items():
            db_path, secret = fresh_database(workdir, f"g{len(contenders)}.db")
            contenders[name] = Contender(servers.start(db_path, args.threads, gunicorn=options), secret=secret,
                                         refusals_allowed=options is not None)
        table = alternate(contenders, args, workdir)
    _report_table("servers", table, "waitress")
    return table


def big_database_stage(args: argparse.Namespace, workdir: Path) -> dict:
    """Ingest on a database prefilled with --rows delivery-log rows against an empty one; pages; RSS."""
    big_db = workdir / "big.db"
    secret, seconds = prefill(big_db, args.rows)
    print(f"prefilled {args.rows:,} rows in {seconds:.0f} s ({big_db.stat().st_size / 2**20:.0f} MB)", flush=True)
    with Servers() as servers:
        empty_db, empty_secret = fresh_database(workdir, "empty-again.db")
        big = servers.start(big_db, args.threads)
        table = alternate({"empty database": Contender(servers.start(empty_db, args.threads), secret=empty_secret),
                           f"{args.rows:,} rows": Contender(big, secret=secret)}, args, workdir)
        _report_table("a big database", table, "empty")
        result = {"table": table, "pages": time_pages(big.port), "peak_rss_mb": big.peak_rss_mb()}
    _report_pages(result)
    return result


def _latency(result: dict) -> str:
    return f"p50 {result['p50_ms']:5.1f} ms  p99 {result['p99_ms']:6.1f} ms"


def _report_table(title: str, table: dict[str, dict], first: str | None) -> None:
    print(f"\n{title}:")
    for name, row in table.items():
        compared = f"  {row['vs_first']:4.2f} x {first}, CPU {row['cpu_vs_first']:4.2f} x" if first else ""
        refused = f"  {row['not_200']} not 200" if row["not_200"] else ""
        print(f"  {name:38s} {row['rate']:7.0f} /s  CPU {row['user_us']:5.0f} user + {row['system_us']:4.0f} sys us"
              f"  {_latency(row)}{compared}{refused}", flush=True)


def _report_pages(r: dict) -> None:
    pages = r["pages"]
    print(f"  Referrals tab, first page   {pages['tab_first_page_ms']:.1f} ms server time"
          " (target <= 20; includes analytics)")
    print(f"  deep page ({pages['deep_pages_followed']} x older)     {pages['deep_page_ms']:.1f} ms "
          f"(max {pages['deep_pages_max_ms']:.1f})")
    print(f"  filtered page               {pages['filtered_page_ms']:.1f} ms")
    print(f"  search by server_event_id   {pages['search_page_ms']:.1f} ms")
    print(f"  CSV export                  {pages['csv_ms']:.0f} ms for {pages['csv_rows']:,} rows (wall time)")
    print(f"  peak RSS                    {r['peak_rss_mb']:.0f} MB (target <= 80)", flush=True)


if __name__ == "__main__":
    main()
