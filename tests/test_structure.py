"""Issue 7's structure, checked mechanically: every SQL statement of mmoref_server.py is in the
storage section's classes (or its schema lists), nothing cites the SPEC file the repository does
not ship, and the file's banner sections come in the documented data-flow order."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "mmoref_server.py"

# A statement's first words, so prose that starts with the same word ("Delete old rows...") is not SQL.
SQL_START = re.compile(r"""\s*(
      SELECT\s.*?\bFROM\b | SELECT\s+[\d(*] | INSERT\s+(OR\s+\w+\s+)?INTO\b | UPDATE\s+\S+\s+SET\b | DELETE\s+FROM\b
    | CREATE\s+(UNIQUE\s+)?(TABLE|INDEX|TRIGGER|VIEW)\b | ALTER\s+TABLE\b | PRAGMA\s+\w
    | (BEGIN|COMMIT|ROLLBACK|VACUUM)(\s+(IMMEDIATE|EXCLUSIVE|DEFERRED|TRANSACTION|TO\s+\w+|INTO\s+\S+))?\s*;?\s*$
    | (SAVEPOINT|RELEASE)\s+\w+\s*$ | WITH\s+\w+\s*(\([^)]*\)\s*)?AS\b
)""", re.IGNORECASE | re.VERBOSE | re.DOTALL)
# module-level schema lists, besides the storage classes
SQL_HOMES = ("SCHEMA", "MIGRATIONS")
BANNER = re.compile(r"^# (?P<title>\S.*?) #{5,}$", re.MULTILINE)
# the contract first, in the order one signed event flows; then what it stands on and what the owner uses
DOCUMENTED_ORDER = ("Configuration", "Errors and hints", "Signing", "Tokens", "Storage interface", "State machine",
                    "Ingest pipeline", "Routes", "Storage", "Maintenance", "Dashboard views", "App factory",
                    "Command line", "Kit-side sender", "Templates and style sheet", "main")


def banners(source: str) -> list[tuple[int, str]]:
    """(line number, title) of every `# Title ####...` banner."""
    return [(source.count("\n", 0, match.start()) + 1, match["title"]) for match in BANNER.finditer(source)]


def section_title(banner_title: str) -> str:
    """"Routes: ingest, share link, health" -> "Routes"; "Signing (docs/contract.md §1.1)" -> "Signing"."""
    return re.split(r"[:(]", banner_title)[0].strip()


def storage_sections(source: str) -> list[tuple[int, int]]:
    """(first line, line after the last) of each `Storage...` section: the interface and the store."""
    found = banners(source) + [(len(source.splitlines()) + 1, "end of file")]
    return [(line, found[index + 1][0]) for index, (line, title) in enumerate(found[:-1])
            if title.startswith("Storage")]


def in_storage(line: int, sections: list[tuple[int, int]]) -> bool:
    return any(start <= line < end for start, end in sections)


def sql_homes(tree: ast.Module, sections: list[tuple[int, int]]) -> list[ast.AST]:
    """The classes defined in the storage sections, and the assignments named in SQL_HOMES."""
    homes: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and in_storage(node.lineno, sections):
            homes.append(node)
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(target, ast.Name) and target.id in SQL_HOMES for target in targets):
            homes.append(node)
    return homes


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring constants: prose, even when it names a statement."""
    owners = [tree, *(node for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(owner.body[0].value) for owner in owners
            if owner.body and isinstance(owner.body[0], ast.Expr) and isinstance(owner.body[0].value, ast.Constant)}


def strings(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    """Every string literal with its text; an f-string as a whole, `{}` for each value put in."""
    pieces = {id(value) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for value in node.values}
    found: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found.append((node, "".join(value.value if isinstance(value, ast.Constant) else "{}"
                                        for value in node.values)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in pieces:
            found.append((node, node.value))
    return found


def sql_offenders(source: str) -> list[str]:
    """`line N: text` of every SQL-looking string outside the storage classes and the schema lists."""
    tree = ast.parse(source)
    allowed = docstrings(tree) | {id(node) for home in sql_homes(tree, storage_sections(source))
                                  for node in ast.walk(home)}
    return [f"line {node.lineno}: {text.strip()[:60]!r}" for node, text in strings(tree)
            if SQL_START.match(text) and id(node) not in allowed]


def test_every_sql_statement_is_in_the_storage_classes_or_migrations() -> None:
    offenders = sql_offenders(SERVER.read_text())
    assert offenders == [], "SQL outside the storage section's classes:\n" + "\n".join(offenders)


def test_the_sql_check_finds_statements_outside_storage_and_not_prose() -> None:
    source = '''
# Storage ######################################################################
class Store:
    def count(self, db):
        return db.execute("SELECT count(*) FROM servers")

# Routes #######################################################################
def stray(db, table):
    """Delete from the old table: prose, not SQL."""
    db.execute(f"update {table} set x = 1")
    return "Select a server first", "  DELETE FROM servers"
'''
    assert sql_offenders(source) == ["line 10: 'update {} set x = 1'", "line 11: 'DELETE FROM servers'"]


def test_the_storage_section_holds_store_and_transaction() -> None:
    source = SERVER.read_text()
    names = {node.name for node in sql_homes(ast.parse(source), storage_sections(source))
             if isinstance(node, ast.ClassDef)}
    assert {"Store", "Transaction"} <= names


def test_only_the_storage_section_names_a_database_driver() -> None:
    """The state machine, the pipeline and the rest see Store, Row and StoreError: sqlite3 (and psycopg,
    in mmoref_postgres.py) appear only where the store is implemented."""
    source = SERVER.read_text()
    sections = storage_sections(source)
    outside = [f"line {number}: {line.strip()}" for number, line in enumerate(source.splitlines(), start=1)
               if not in_storage(number, sections) and re.search(r"\b(sqlite3|psycopg)\.", line)]
    assert outside == [], "a database driver named outside the storage section:\n" + "\n".join(outside)


def test_no_tracked_file_but_the_contract_mentions_spec_md() -> None:
    spec = b"SPEC" + b".md"  # spelled in two parts so this file does not cite it
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                             timeout=30).stdout.decode().split("\0")
    citing = [name for name in tracked if name and name != "docs/contract.md"
              and (ROOT / name).is_file() and spec in (ROOT / name).read_bytes()]
    assert citing == [], f"these files cite the SPEC file, which the repository does not ship: {citing}"
    assert "docs/contract.md" in (ROOT / "README.md").read_text()


def test_banner_sections_follow_the_documented_order() -> None:
    titles = [section_title(title) for _, title in banners(SERVER.read_text())]
    assert tuple(titles) == DOCUMENTED_ORDER


def docstring_map(source: str) -> list[str]:
    """The section names the module docstring lists, after its "Sections" line."""
    listed = ast.get_docstring(ast.parse(source), clean=True).split("Sections", 1)[1].split("\n", 2)[2]
    return [name.strip().rstrip(".") for name in re.split(r"[,;]", listed) if name.strip()]


def test_the_docstring_map_names_the_banners_in_order() -> None:
    source = SERVER.read_text()
    assert docstring_map(source) == [section_title(title) for _, title in banners(source)]


def test_the_contract_core_comes_first_and_one_event_reads_down_the_page() -> None:
    """From the route down: the pipeline, the state machine and the Transaction they call are defined
    above the ingest route, and the store's implementation only after it."""
    source = SERVER.read_text()
    lines = {node.name: node.lineno for node in ast.parse(source).body if hasattr(node, "name")}
    route_line = source.index("def ingest()")
    route = source.count("\n", 0, route_line) + 1
    core = ["sign", "verify", "read_token", "Transaction", "apply_event", "process_event", "handle_ingest"]
    assert [lines[name] for name in core] == sorted(lines[name] for name in core)
    assert lines["handle_ingest"] < route < lines["Store"] < lines["SQLiteStore"] < lines["create_app"]
