"""The benchmark's yardstick: mmoref's own app plus a no-op JSON route, served like `serve` does.

    python bench/noop_server.py PORT     (MMOREF_DB and MMOREF_THREADS from the environment)

`create_app()`, the product's waitress options and thread count, and the same logging
set-up as `python mmoref_server.py serve`; `GET /noop` answers `{"ok": true}` and touches
nothing else. What ingest costs beyond this route is what mmoref itself adds. Not shipped.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mmoref_server as mm  # noqa: E402


def noop() -> object:
    return mm.json_response({"ok": True})


def main() -> None:
    settings = mm.load_settings()
    app = mm.create_app()
    app.add_url_rule("/noop", "noop", noop)
    server = mm._listen(app, "127.0.0.1", int(sys.argv[1]), settings["MMOREF_THREADS"])
    mm._configure_logging(settings["MMOREF_LOG_FORMAT"])
    server.run()


if __name__ == "__main__":
    main()
