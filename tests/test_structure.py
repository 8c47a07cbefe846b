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
DOCUMENTED_ORDER = ("Configuration", "Errors and hints", "Signing", "Kit-side sender", "Tokens", "Storage",
                    "State machine", "Ingest pipeline", "Routes", "Dashboard", "App factory", "Command line",
                    "Templates", "main")


def banners(source: str) -> list[tuple[int, str]]:
    """(line number, title) of every `# Title ####...` banner."""
    return [(source.count("\n", 0, match.start()) + 1, match["title"]) for match in BANNER.finditer(source)]


def storage_section(source: str) -> tuple[int, int]:
    """The lines from the first `Storage...` banner to the next banner of another section."""
    found = banners(source)
    start = next(line for line, title in found if title.startswith("Storage"))
    end = next((line for line, title in found if line > start and not title.startswith("Storage")),
               len(source.splitlines()) + 1)
    return start, end


def sql_homes(tree: ast.Module, section: tuple[int, int]) -> list[ast.AST]:
    """The classes defined in the storage section, and the assignments named in SQL_HOMES."""
    homes: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and section[0] < node.lineno < section[1]:
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
    allowed = docstrings(tree) | {id(node) for home in sql_homes(tree, storage_section(source))
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
    section = storage_section(source)
    names = {node.name for node in sql_homes(ast.parse(source), section) if isinstance(node, ast.ClassDef)}
    assert {"Store", "Transaction"} <= names


def test_only_the_storage_section_names_a_database_driver() -> None:
    """The state machine, the pipeline and the rest see Store, Row and StoreError: sqlite3 (and psycopg,
    in mmoref_postgres.py) appear only where the store is implemented."""
    source = SERVER.read_text()
    start, end = storage_section(source)
    outside = [f"line {number}: {line.strip()}" for number, line in enumerate(source.splitlines(), start=1)
               if not start <= number < end and re.search(r"\b(sqlite3|psycopg)\.", line)]
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
    titles = [title for _, title in banners(SERVER.read_text())]
    found = [next((title for title in titles if title.startswith(expected)), None) for expected in DOCUMENTED_ORDER]
    missing = [expected for expected, title in zip(DOCUMENTED_ORDER, found) if title is None]
    assert missing == [], f"no banner for {missing}; banners: {titles}"
    positions = [titles.index(title) for title in found]
    assert positions == sorted(positions), f"banners out of order: {titles}"
