"""`aisopod-session`: look into a store, back it up, move it, clean it, without SQL.

Every command takes `--db` (a path or a URL; also `AISOPOD_SESSION_DB`; default
`./aisopod-sessions.db`), before or after the command's name. Reading commands take
`--json` for machine-readable output. What the command could not do (a missing store, an
unknown session, a newer schema...) prints one `error:` line on stderr and exits with
status 1; a usage error (an unknown option, a value of the wrong form: a bad integer,
status, time, duration, key...) prints the usage and one `error:` line naming the option,
in our words, and exits with 2, before anything is written.

Only Typer and the light `aisopod_session.enums` are imported here: `--help` and
`--version` start at once. Rich, SQLAlchemy, pydantic and the store's modules are
imported by the commands that use them (annotations are strings, their types imported
for type checkers only).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar, cast

import typer
from typer.core import TyperCommand, TyperGroup

from aisopod_session.blocks import MEDIA_LABELS, TEXT_BLOCKS, TOOL_RESULT, TOOL_USE, tool_call_list
from aisopod_session.enums import PeerKind, Role, SessionStatus

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy import Engine

    from aisopod_session.migrations import AppliedMigration
    from aisopod_session.models import Message, Session
    from aisopod_session.repository import SessionRepository
    from aisopod_session.results import Totals

DATABASE_ENV = "AISOPOD_SESSION_DB"
DEFAULT_DATABASE = "aisopod-sessions.db"

# `-h` as well as `--help`, on every command.
_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _base_of_bad_parameter(name: str) -> type[Exception]:
    """The class `name` among typer.BadParameter's bases (click's, which Typer vendors and
    raises without exporting them)."""
    return next(
        (kind for kind in typer.BadParameter.__mro__ if kind.__name__ == name),
        typer.BadParameter,
    )


_USAGE_ERROR = _base_of_bad_parameter("UsageError")  # every usage error Typer raises
_TYPER_ERROR = _base_of_bad_parameter("ClickException")  # every error Typer reports


class UsageProblem(_USAGE_ERROR):  # type: ignore[misc, valid-type]
    """A value given on the command line that cannot be right (a time that is no time, a
    duration out of range, two options that exclude each other): reported as a usage
    error naming `option`, exit status 2, before the store is opened or written."""

    def __init__(self, option: str, message: str) -> None:
        # `friendly` gives it the command's context (for the usage line).
        super().__init__(f"{option}: {message}")
        self.option = option


# Our own placeholders in help and usage lines, in place of Typer's: a required argument's
# braces (`{KEY-OR-ID}`) and an argument's Python type (`KEY-OR-ID <str>`).
_BRACED = re.compile(r"\{([A-Z][A-Za-z0-9_.-]*)\}")
_ARGUMENT_TYPE = re.compile(r"^(\s+[A-Z][A-Za-z0-9_.-]*) <[a-z ]+>", re.MULTILINE)


def our_placeholders(text: str) -> str:
    """Help or usage text as Typer renders it, with its placeholders in our own form:
    `KEY-OR-ID` for `{KEY-OR-ID}` and `KEY-OR-ID <str>` (the width kept, so the columns
    stay aligned)."""
    text = _BRACED.sub(r"\1", text)
    return _ARGUMENT_TYPE.sub(lambda m: m.group(1) + " " * (len(m.group()) - len(m.group(1))), text)


class _Command(TyperCommand):
    """A command whose help and usage lines use our placeholders (`our_placeholders`)."""

    def get_help(self, ctx: Any) -> str:
        return our_placeholders(str(super().get_help(ctx)))

    def get_usage(self, ctx: Any) -> str:
        return our_placeholders(str(super().get_usage(ctx)))


class _Group(TyperGroup):
    """The command group: usage errors (Typer's and `UsageProblem`) reported in our words,
    in one `error:` line after the usage, with exit status 2; the rest as Typer does."""

    def get_help(self, ctx: Any) -> str:
        return our_placeholders(str(super().get_help(ctx)))

    def get_usage(self, ctx: Any) -> str:
        return our_placeholders(str(super().get_usage(ctx)))

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 3:  # standalone_mode given by position: the caller's way
            return super().main(*args, **kwargs)
        caller_handles_errors = not kwargs.pop("standalone_mode", True)
        kwargs["standalone_mode"] = False
        if caller_handles_errors:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **kwargs)
        except _USAGE_ERROR as exc:
            report_usage_error(exc)
            sys.exit(2)
        except typer.Abort:
            sys.stderr.write("Aborted.\n")
            sys.exit(1)
        except _TYPER_ERROR as exc:  # another of Typer's errors (none is expected)
            sys.stderr.write(f"error: {terminal_safe(str(exc))}\n")
            sys.exit(getattr(exc, "exit_code", 1))
        sys.exit(code if isinstance(code, int) else 0)


def report_usage_error(exc: Exception) -> None:
    """Print a usage error on stderr: the command's usage and where to find help (when the
    command is known), then `error: ` and what is wrong, naming the option, in one line.
    A bare command group's "error" is its help (`aisopod-session` alone), printed as is."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":
        sys.stderr.write(str(getattr(exc, "message", exc)) + "\n")
        return
    if ctx is not None:
        sys.stderr.write(f"{ctx.get_usage()}\nTry '{ctx.command_path} -h' for help.\n\n")
    sys.stderr.write(f"error: {terminal_safe(usage_message(exc))}\n")


def parameter_name(param: Any) -> str:
    """How an option (its first long name) or an argument (its metavar) is named."""
    if getattr(param, "param_type_name", None) == "argument":
        return str(param.metavar or param.name.upper())
    names = [str(name) for name in getattr(param, "opts", ())] or [f"--{param.name}"]
    return next((name for name in names if name.startswith("--")), names[0])


def usage_message(exc: Exception) -> str:
    """A usage error in our words, in one line, naming the option or argument."""
    param = getattr(exc, "param", None)
    message = " ".join(str(getattr(exc, "message", exc)).split())
    if isinstance(exc, UsageProblem):  # ours: already in our words
        return message
    if isinstance(exc, typer.BadParameter) and param is not None:
        name = parameter_name(param)
        if hasattr(exc, "param_type"):  # a missing value
            kind = "argument" if getattr(param, "param_type_name", "") == "argument" else "option"
            shown = name if kind == "argument" else f"{name} {param.metavar or 'VALUE'}"
            return f"missing {kind} {shown}"
        return f"{name}: {message.removeprefix('Value error, ')}"
    option = getattr(exc, "option_name", None)
    if option is not None:
        if hasattr(exc, "possibilities"):  # an option that does not exist
            close = sorted(getattr(exc, "possibilities", None) or ())
            return f"no option {option}" + (
                f"; did you mean {' or '.join(close)}?" if close else ""
            )
        return f"{option}: needs a value"
    message = message.rstrip(".")
    return message[:1].lower() + message[1:]


app = typer.Typer(
    name="aisopod-session",
    help="Inspect, export, import and maintain an aisopod session store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=_CONTEXT,
    cls=_Group,
)
sessions_app = typer.Typer(
    help="List, show and delete sessions (and compact, reset, prune, mark-idle).",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=_CONTEXT,
    cls=_Group,
)
app.add_typer(sessions_app, name="sessions")


# --- what reaches the operator's terminal ------------------------------------------------

# Characters a terminal acts on instead of showing: every control character (Unicode's Cc:
# C0, DEL and C1, such as ESC starting a sequence that clears the screen, retitles the
# window or writes the clipboard, CR overwriting the line, and the one-byte CSI \x9b) but
# newline and tab, and the bidirectional overrides and isolates that reorder what follows.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` with every control character but newline and tab, and every bidirectional
    override or isolate, written as an escape (`\\x1b`, `\\r`, `\\x9b`, `\\u202e`); the
    rest, other non-ASCII text included, unchanged."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0x0D:
        return "\\r"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def json_safe(text: str) -> str:
    """JSON text with the characters `terminal_safe` escapes, where json.dumps leaves them
    raw (DEL, C1, the bidirectional ones), written as JSON escapes (`\\u009b`). Those can
    only stand inside JSON strings, so the JSON means exactly the same."""
    return _UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


class _JsonSafeWriter:
    """Writes to `stream` through `json_safe` (for JSON Lines written to stdout)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(json_safe(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


@functools.cache
def _console_class() -> type[Console]:
    """Rich's `Console` as the command prints through it (Rich imported on first use)."""
    from rich.console import Console
    from rich.text import Text

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # Rich would exit with status 1 and no word; `friendly` ends quietly with 141.
            raise BrokenPipeError

        def render_str(self, text: str, **options: Any) -> Text:
            """Every string printed, table cells and markup included, becomes Rich text
            here: escaping it here keeps any stored text from driving the terminal (markup
            tags hold no control character, so they are read as before)."""
            return super().render_str(terminal_safe(text), **options)

    return _Console


class _LazyConsole:
    """A `_Console` made with `options` when first used: `--help` and `--version` never
    import Rich. Every attribute is the console's."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._made: Console | None = None

    def console(self) -> Console:
        if self._made is None:
            self._made = _console_class()(**self._options)
        return self._made

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console(), name)


def real_console(console: Console) -> Console:
    """The console itself behind `out` or `err` (for Rich's own objects, such as a
    progress bar, which may set its attributes)."""
    return console.console() if isinstance(console, _LazyConsole) else console


# Piped or captured output gets wide lines, so that tables are not wrapped at 80 columns.
# No markup or emoji codes in what is printed (a key like `a:b:c:thread:d` holds one):
# only the transcript's lines ask for markup, with their text escaped.
out = cast(
    "Console",
    _LazyConsole(
        highlight=False,
        soft_wrap=True,
        markup=False,
        emoji=False,
        width=None if sys.stdout is not None and sys.stdout.isatty() else 200,
    ),
)
err = cast(
    "Console",
    _LazyConsole(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False),
)


@dataclass
class Settings:
    db: str | None = None
    json: bool = False


DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="PATH-OR-URL",
        help=f"The store: a file path or a database URL [env {DATABASE_ENV}; "
        f"default ./{DEFAULT_DATABASE}].",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

MAX_INTEGER = 2**63 - 1
"""The largest integer a store holds (SQLite's INTEGER and PostgreSQL's bigint)."""


# ASCII digits only (int() would also read full-width and Arabic-Indic digits, and `1_000`).
_INTEGER = re.compile(r"\s*([+-]?)([0-9]+)\s*")


def whole_number(minimum: int, maximum: int = MAX_INTEGER) -> Callable[[Any], int]:
    """A parser for an integer option: ASCII digits within [minimum, maximum], else
    `typer.BadParameter` in our words (a usage error naming the option, exit status 2)."""

    def parse(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            match = _INTEGER.fullmatch(str(value))
            if match is None:
                raise typer.BadParameter(f"{value!r} is not a whole number")
            sign, digits = match.groups()
            significant = digits.lstrip("0") or "0"
            # Beyond MAX_INTEGER's 19 digits, no need to convert (5000 digits would be slow).
            number = int(sign + significant) if len(significant) <= 20 else MAX_INTEGER + 1
            if sign == "-" and number > 0:
                number = -number
        if not minimum <= number <= maximum:
            most = f"{MAX_INTEGER} (2^63 - 1)" if maximum == MAX_INTEGER else str(maximum)
            raise typer.BadParameter(f"must be from {minimum} to {most}; got {value}")
        return number

    return parse


def integer_option(
    minimum: int, help_text: str, *names: str, metavar: str = "N", hidden: bool = False
) -> Any:
    """An integer option kept within [minimum, MAX_INTEGER]: a value outside, or not a
    whole number, is a usage error (exit status 2) naming the option and the range."""
    return typer.Option(
        *names, parser=whole_number(minimum), metavar=metavar, help=help_text, hidden=hidden
    )


E = TypeVar("E", PeerKind, SessionStatus, Role)


def choice(kind: type[E]) -> Callable[[Any], E]:
    """A parser for an enum option: a member's value in any case, as the API takes it;
    else `typer.BadParameter` listing the values (a usage error, exit status 2)."""

    def parse(value: Any) -> E:
        if isinstance(value, kind):
            return value
        wanted = str(value).strip().casefold()
        for member in kind:
            if member.value.casefold() == wanted:
                return member
        raise typer.BadParameter(
            f"{value!r} is not one of {', '.join(member.value for member in kind)}"
        )

    return parse


def values_of(kind: type[E]) -> str:
    """`dm, group, channel or thread`: an enum's values, for a help text."""
    *first, last = (member.value for member in kind)
    return f"{', '.join(first)} or {last}"


def print_version(value: bool) -> None:
    """`--version`: print the installed version and stop."""
    if value:
        from importlib.metadata import version

        print(f"aisopod-session {version('aisopod-session')}")
        raise typer.Exit()


@app.callback()
def settings(
    ctx: typer.Context,
    db: DbOption = None,
    json_output: JsonOption = False,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Inspect, export, import and maintain an aisopod session store."""
    ctx.obj = Settings(db=db, json=json_output)
    show_warnings()


class _Warnings(logging.Handler):
    """The store's warnings (a damaged row left out of a listing or an export, say) as
    one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"warning: {without_passwords(record.getMessage())}", style="yellow")


_WARNINGS = _Warnings(logging.WARNING)


def show_warnings() -> None:
    """Print the library's warnings on stderr (once, however many commands run)."""
    library = logging.getLogger("aisopod_session")
    if _WARNINGS not in library.handlers:
        library.addHandler(_WARNINGS)


class UserError(Exception):
    """A mistake of the caller's, reported in one line."""


F = TypeVar("F", bound=Callable[..., Any])


def friendly(command: F) -> F:
    """Turn the store's and the user's errors into one line on stderr and exit status 1
    (`AISOPOD_DEBUG=1` shows the traceback instead)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except _USAGE_ERROR as exc:
            if getattr(exc, "ctx", None) is None:
                exc.ctx = kwargs.get("ctx")  # type: ignore[attr-defined]
            raise
        except BrokenPipeError:
            # The reader went away (`... | head`): stop quietly, as `cat` would.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:
            if os.environ.get("AISOPOD_DEBUG"):
                raise
            err.print(f"error: {one_line(exc)}", style="red")
            raise typer.Exit(1) from None

    return run  # type: ignore[return-value]


def _own_words(message: str) -> str:
    """A pydantic error's message without pydantic's framing (`Value error, `)."""
    return message.removeprefix("Value error, ")


def one_line(exc: Exception) -> str:
    """What went wrong, in one line."""
    from pydantic import ValidationError

    from aisopod_session.errors import SessionStoreError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {_own_words(error['msg'])}"
            for error in exc.errors()
        )
    if isinstance(exc, UserError | SessionStoreError | ValueError | OSError):
        message = str(exc)
    else:
        message = f"unexpected {type(exc).__name__}: {exc}"
    # An error may quote the URL it was given (one that does not parse, say).
    return without_passwords(" ".join(message.split()))


# --- naming a store without its password --------------------------------------------------

# A URL's password: after `scheme://user:` up to the `@` (SQLAlchemy's own reading), or a
# `password=` query parameter (which libpq takes too).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][\w+.-]*://[^:/?#@\s]*:)[^@\s]*(?=@)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#\s'\"]*", re.IGNORECASE)


def shown_target(target: str) -> str:
    """How a store is named in anything printed: a path as given; a URL as SQLAlchemy
    renders it with its password hidden (`***`), a `password=` query parameter too. A URL
    that does not parse is masked by `without_passwords`."""
    if "://" not in target:
        return target
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        rendered = make_url(target).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        rendered = target
    return without_passwords(rendered)


def without_passwords(text: str) -> str:
    """`text` with the password of every URL in it, and every `password=` query
    parameter, replaced by `***`."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***", text))


# --- opening the store --------------------------------------------------------------------


def target_of(ctx: typer.Context, db: str | None) -> str:
    settings: Settings = ctx.obj
    return db or settings.db or os.environ.get(DATABASE_ENV) or DEFAULT_DATABASE


def wants_json(ctx: typer.Context, flag: bool) -> bool:
    settings: Settings = ctx.obj
    return flag or settings.json


def file_of(target: str) -> Path | None:
    """The SQLite file a target names, or None for a server or `:memory:`."""
    from aisopod_session.database import database_url

    url = database_url(target)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(str(url.database))


# The files SQLite keeps beside a database: its write-ahead log, the log's shared-memory
# index and the rollback journal. Writing over any of them damages the store.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def store_files(store: Path) -> list[Path]:
    """The store's file and the files SQLite keeps beside it, under the name given and
    under the name it resolves to (SQLite names them after a symlink's target)."""
    real = Path(os.path.realpath(store))
    return [
        name.with_name(name.name + suffix)
        for name in dict.fromkeys((store, real))
        for suffix in ("", *SQLITE_COMPANIONS)
    ]


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same device and inode when both exist (so
    through symlinks and hard links), else the same path once resolved (`x/../`,
    symlinks)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_store_file(label: str, file: Path, target: str, why: str) -> None:
    """`UserError` ("`label` is the session store's file ...: `why`") if `file` is the
    SQLite store `target`'s own file or one SQLite keeps beside it. Nothing is opened:
    call it before touching either."""
    store = file_of(target)
    if store is None:
        return
    for own in store_files(store):
        if same_file(file, own):
            raise UserError(f"{label} is the session store's file {own}: {why}")


def server_of(target: str) -> str | None:
    """The PostgreSQL database and user a target names, as one comparable text without
    a password, or None for SQLite."""
    from aisopod_session.database import database_url

    url = database_url(target)
    if url.get_backend_name() != "postgresql":
        return None
    return url._replace(
        drivername="postgresql", password=None, port=url.port or 5432
    ).render_as_string(hide_password=False)


def refuse_copy_into_itself(source: str, target: str) -> None:
    """`UserError` if `target` is the store `source` (the same SQLite file however named,
    or the same server URL but for its password and driver). `copy_database` guards
    this too; here it is caught before the target is opened."""
    file = file_of(target)
    if file is not None:
        refuse_store_file(
            f"--to {shown_target(target)}", file, source, "a store cannot be copied into itself"
        )
        return
    server = server_of(target)
    if server is not None and server == server_of(source):
        raise UserError(
            f"--to {shown_target(target)} is the same store as --db: a store cannot be "
            "copied into itself"
        )


@contextmanager
def opened(target: str, *, create: bool = False, migrate: bool = False) -> Iterator[Engine]:
    """The store's engine for the block. A missing file is an error unless `create`; a
    store behind this code's schema is an error unless `migrate` (reading commands never
    change the schema)."""
    from aisopod_session.database import open_database

    path = file_of(target)
    if path is not None and not create and not path.exists():
        raise UserError(
            f"no session store at {path}: pass --db (or set {DATABASE_ENV}), or create one "
            "with `aisopod-session init`"
        )
    engine = open_database(target, migrate=migrate)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def repository(target: str) -> Iterator[SessionRepository]:
    """A repository on an existing store at this code's schema version."""
    from aisopod_session.migrations import SCHEMA_VERSION, current_version
    from aisopod_session.repository import SessionRepository

    with opened(target) as engine:
        version = current_version(engine)
        if version < SCHEMA_VERSION:
            raise UserError(
                f"the store is at schema version {version}, this aisopod-session needs "
                f"{SCHEMA_VERSION}: run `aisopod-session migrate` first"
            )
        yield SessionRepository(engine)


# An id is ASCII digits only: `str.isdigit` would take full-width or Arabic-Indic digits
# (and int() read them as another number).
_SESSION_ID = re.compile(r"[0-9]+")


def find_session(repo: SessionRepository, key_or_id: str) -> Session:
    """The session named by its id (ASCII digits) or its key; `UserError` if there is
    none."""
    from aisopod_session.keys import SessionKey

    text = key_or_id.strip()
    if _SESSION_ID.fullmatch(text):
        return session_by_id(repo, text)
    try:
        key = SessionKey.parse(text)
    except ValueError as exc:
        raise UsageProblem(
            "KEY-OR-ID",
            f"{text!r} is neither a session id nor a key (agent:channel:account:kind:peer): "
            f"{one_line(exc)}",
        ) from None
    found = repo.get(key)
    if found is None:
        raise UserError(f"no session for key {key}")
    return found


def session_by_id(repo: SessionRepository, digits: str) -> Session:
    """The session with the id `digits` spells; `UserError` if there is none, as for an
    id beyond MAX_INTEGER, which no store holds (it is not even converted)."""
    significant = digits.lstrip("0") or "0"
    found = None
    if len(significant) <= len(str(MAX_INTEGER)) and int(significant) <= MAX_INTEGER:
        found = repo.get_by_id(int(significant))
    if found is None:
        raise UserError(f"no session with id {digits}")
    return found


def print_json(value: Any) -> None:
    """`value` as indented JSON on stdout, non-ASCII text readable but no character a
    terminal would act on raw (`json_safe`)."""
    sys.stdout.write(json_safe(json.dumps(value, ensure_ascii=False, indent=2)) + "\n")


def when(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}Z"


# --- init and migrate ---------------------------------------------------------------------


@app.command(cls=_Command)
@friendly
def init(ctx: typer.Context, db: DbOption = None) -> None:
    """Create the store (or bring an existing one up to date)."""
    target = target_of(ctx, db)
    created, applied, version = upgrade(target)
    name = shown_target(target)
    if created:
        out.print(f"Created {name} at schema version {version}.")
    elif applied:
        out.print(f"Upgraded {name} to schema version {version} ({len(applied)} migration(s)).")
    else:
        out.print(f"{name} is ready at schema version {version}; nothing to do.")


def upgrade(target: str, *, quiet: bool = False) -> tuple[bool, list[AppliedMigration], int]:
    """Create or migrate the store: whether it was created, the migrations applied now,
    and the schema version. On a terminal (unless `quiet`), a bar counts the migrations
    while they run (a big store's take a while), one step per migration."""
    from aisopod_session.migrations import (
        MIGRATIONS,
        applied_migrations,
        current_version,
        run_migrations,
    )

    path = file_of(target)
    created = path is not None and not path.exists()
    with opened(target, create=True) as engine:
        before = set() if created else {m.version for m in applied_migrations(engine)}
        pending = [m for m in MIGRATIONS if m.version > max(before, default=0)]
        with progress_bar(
            "migrating", len(pending), "migrations", hide=quiet or not pending
        ) as report:
            run_migrations(engine, progress=lambda done, _total: report(done))
        applied = [m for m in applied_migrations(engine) if m.version not in before]
        return created, applied, current_version(engine)


@app.command(cls=_Command)
@friendly
def migrate(
    ctx: typer.Context,
    status: Annotated[
        bool, typer.Option("--status", help="List applied and pending migrations; change nothing.")
    ] = False,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Apply pending migrations (creating the store if needed), or with --status list
    them."""
    from rich.table import Table

    from aisopod_session.migrations import (
        MIGRATIONS,
        SCHEMA_VERSION,
        applied_migrations,
        current_version,
    )

    target = target_of(ctx, db)
    if not status:
        _, applied, version = upgrade(target, quiet=wants_json(ctx, json_output))
        if wants_json(ctx, json_output):
            print_json({"schema_version": version, "applied": [m.version for m in applied]})
            return
        for migration in applied:
            out.print(f"applied {migration.version}: {migration.name}")
        out.print(f"{shown_target(target)} is at schema version {version}.")
        return
    with opened(target) as engine:
        applied_now = {m.version: m for m in applied_migrations(engine)}
        version = current_version(engine)
    rows: list[dict[str, Any]] = []
    for step in MIGRATIONS:
        done = applied_now.get(step.version)
        rows.append(
            {
                "version": step.version,
                "name": step.name,
                "status": "applied" if done else "pending",
                "applied_at": None
                if done is None or done.applied_at is None
                else done.applied_at.isoformat(),
                # False for a version applied without a row of its own (the Rust crate's
                # schema_version keeps only its latest version) and for a pending one.
                "recorded": done is not None and done.recorded,
            }
        )
    if wants_json(ctx, json_output):
        print_json({"schema_version": version, "code_version": SCHEMA_VERSION, "migrations": rows})
        return
    table = Table(
        "version", "name", "status", "applied at", title=f"Migrations of {shown_target(target)}"
    )
    for row in rows:
        table.add_row(
            str(row["version"]),
            str(row["name"]),
            str(row["status"]),
            applied_text(row),
        )
    out.print(table)
    pending = sum(row["status"] == "pending" for row in rows)
    out.print(
        f"schema version {version}; "
        + (f"{pending} pending: run `aisopod-session migrate`" if pending else "up to date")
    )


def applied_text(row: dict[str, Any]) -> str:
    """The `applied at` cell of `migrate --status`: the time, `not recorded` for a
    version applied without a row of its own (or without its time), `-` if pending."""
    if row["applied_at"] is not None:
        return when(datetime.fromisoformat(row["applied_at"]))
    return "-" if row["status"] == "pending" else "not recorded"


# --- status ---------------------------------------------------------------------------


@app.command(cls=_Command)
@friendly
def status(ctx: typer.Context, db: DbOption = None, json_output: JsonOption = False) -> None:
    """Schema version, sessions by status and by agent, messages, tokens, file sizes."""
    from rich.table import Table

    from aisopod_session.migrations import current_version

    target = target_of(ctx, db)
    with repository(target) as repo:
        summary = repo.summary()
        version = current_version(repo.engine)
        backend = repo.engine.dialect.name
    path = file_of(target)
    sizes: dict[str, int | None] = {"file_bytes": None, "wal_bytes": None}
    if path is not None:
        wal = path.with_name(path.name + "-wal")
        sizes = {
            "file_bytes": path.stat().st_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        }
    report = {
        "database": shown_target(target),
        "backend": backend,
        "schema_version": version,
        "sessions": summary.total.sessions,
        "messages": summary.total.messages,
        "tokens": summary.total.tokens,
        "input_tokens": summary.total.input_tokens,
        "output_tokens": summary.total.output_tokens,
        "sessions_by_status": {
            state.value: totals.sessions for state, totals in summary.by_status.items()
        },
        "damaged_sessions": summary.damaged.sessions,
        "agents": {
            agent: {
                "sessions": totals.sessions,
                "messages": totals.messages,
                "tokens": totals.tokens,
                "input_tokens": totals.input_tokens,
                "output_tokens": totals.output_tokens,
            }
            for agent, totals in summary.by_agent.items()
        },
        **sizes,
    }
    if wants_json(ctx, json_output):
        print_json(report)
        return
    out.print(f"store:          {report['database']} ({backend}, schema version {version})")
    if path is not None:
        out.print(
            f"size:           {size_text(sizes['file_bytes'])} "
            f"+ WAL {size_text(sizes['wal_bytes'])}"
        )
    out.print(f"sessions:       {summary.total.sessions:,}")
    out.print(f"messages:       {summary.total.messages:,}")
    out.print(f"tokens:         {summary.total.tokens:,}{split_text(summary.total)}")
    if summary.by_status:
        out.print(
            "by status:      "
            + ", ".join(f"{s.value} {t.sessions:,}" for s, t in summary.by_status.items())
        )
    if summary.damaged.sessions:
        out.print(
            f"damaged:        {summary.damaged.sessions:,} session(s) whose status or counters "
            "this version cannot read (left out of listings and exports, each named there)"
        )
    if summary.by_agent:
        table = Table("agent", "sessions", "messages", "tokens", title="by agent")
        for agent, totals in summary.by_agent.items():
            table.add_row(
                agent,
                f"{totals.sessions:,}",
                f"{totals.messages:,}",
                f"{totals.tokens:,}{split_text(totals)}",
            )
        out.print(table)


@app.command("vacuum", cls=_Command)
@friendly
def vacuum(ctx: typer.Context, db: DbOption = None, json_output: JsonOption = False) -> None:
    """Give the space of deleted rows back: SQLite checkpoints and empties its WAL and
    rewrites the file (VACUUM); PostgreSQL runs VACUUM ANALYZE on the store's tables.
    Prints the sizes before and after. Writers wait while SQLite rewrites the file."""
    target = target_of(ctx, db)
    with repository(target) as repo:
        engine = repo.engine
        before = store_size(engine, target)
        if engine.dialect.name == "sqlite":
            vacuum_sqlite(engine)
        else:
            vacuum_postgresql(engine)
        after = store_size(engine, target)
    if wants_json(ctx, json_output):
        print_json({"database": shown_target(target), "bytes_before": before, "bytes_after": after})
        return
    out.print(
        f"Vacuumed {shown_target(target)}: {size_text(before)} before, {size_text(after)} "
        f"after ({size_text(max(before - after, 0))} given back)."
    )


def store_size(engine: Engine, target: str) -> int:
    """The store's size in bytes: a SQLite file with its WAL; on PostgreSQL, the store's
    tables with their indexes and TOAST data."""
    path = file_of(target)
    if engine.dialect.name == "sqlite":
        if path is None:  # :memory:
            return 0
        wal = path.with_name(path.name + "-wal")
        return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    from sqlalchemy import text

    with engine.connect() as conn:
        size = conn.execute(
            text(
                "SELECT pg_total_relation_size(to_regclass('sessions')) "
                "+ pg_total_relation_size(to_regclass('messages'))"
            )
        ).scalar_one()
    return int(size)


def vacuum_sqlite(engine: Engine) -> None:
    """Checkpoint the WAL, rewrite the file (VACUUM, which in WAL mode goes through the
    WAL again) and checkpoint once more, truncating the WAL to nothing. On the driver's
    own connection: VACUUM cannot run inside the transaction SQLAlchemy would begin."""
    raw = engine.raw_connection()
    try:
        connection = raw.driver_connection
        assert connection is not None
        for statement in (
            "PRAGMA wal_checkpoint(TRUNCATE)",
            "VACUUM",
            "PRAGMA wal_checkpoint(TRUNCATE)",
        ):
            connection.execute(statement).fetchall()
    finally:
        raw.close()


def vacuum_postgresql(engine: Engine) -> None:
    """VACUUM ANALYZE the store's tables, on a connection in autocommit (VACUUM cannot
    run inside a transaction)."""
    raw = engine.raw_connection()
    try:
        connection = raw.driver_connection
        assert connection is not None
        connection.rollback()  # whatever the pool's ping began: autocommit needs none
        connection.autocommit = True
        try:
            connection.execute("VACUUM ANALYZE sessions, messages")
        finally:
            connection.autocommit = False
    finally:
        raw.close()


def split_text(totals: Totals) -> str:
    """` (12 input, 30 output)`: the part of the tokens callers reported split."""
    return f" ({totals.input_tokens:,} input, {totals.output_tokens:,} output)"


def size_text(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1024:
        return f"{size:,} B"
    scaled = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "GiB":
            break
    return f"{scaled:,.1f} {unit}"


# --- sessions -----------------------------------------------------------------------------

AgentOption = Annotated[
    str | None, typer.Option("--agent-id", metavar="AGENT", help="Only this agent's.")
]
ChannelOption = Annotated[
    str | None, typer.Option("--channel", metavar="CHANNEL", help="Only this channel's.")
]
AccountOption = Annotated[
    str | None, typer.Option("--account-id", metavar="ACCOUNT", help="Only this account's.")
]
# Enum values in any case, as the API takes them (`--peer-kind DM`).
PeerKindOption = Annotated[
    PeerKind | None,
    typer.Option(
        "--peer-kind",
        parser=choice(PeerKind),
        metavar="KIND",
        help=f"Only this kind of peer: {values_of(PeerKind)}.",
    ),
]
PeerOption = Annotated[
    str | None, typer.Option("--peer-id", metavar="PEER", help="Only this peer's.")
]
ParentOption = Annotated[
    int | None,
    integer_option(1, "Only the forks of the session with this id.", "--parent-id", metavar="ID"),
]
StatusOption = Annotated[
    SessionStatus | None,
    typer.Option(
        "--status",
        parser=choice(SessionStatus),
        metavar="STATUS",
        help=f"Only sessions in this status: {values_of(SessionStatus)}.",
    ),
]
# A time: ISO-8601 (UTC without an offset) or a duration ago (`30d`); see `parse_time`.
_TIME_HELP = "TIME: ISO-8601 (UTC without an offset) or a duration ago, such as 30d."
CreatedAfter = Annotated[
    str | None,
    typer.Option("--created-after", metavar="TIME", help=f"Created after TIME. {_TIME_HELP}"),
]
CreatedBefore = Annotated[
    str | None, typer.Option("--created-before", metavar="TIME", help="Created before TIME.")
]
UpdatedAfter = Annotated[
    str | None, typer.Option("--updated-after", metavar="TIME", help="Updated after TIME.")
]
UpdatedBefore = Annotated[
    str | None, typer.Option("--updated-before", metavar="TIME", help="Updated before TIME.")
]
MetaOption = Annotated[
    list[str] | None,
    typer.Option(
        "--meta",
        metavar="KEY=JSON",
        help="Only those whose metadata KEY holds this JSON value (text that is not JSON "
        "is a string: --meta title=Oslo); repeat for more keys.",
    ),
]
KeyOrId = Annotated[
    str,
    typer.Argument(
        metavar="KEY-OR-ID",
        help="A session's id (digits) or its key (agent:channel:account:peer_kind:peer).",
    ),
]


def hidden(name: str) -> Any:
    """An old spelling of an option, still taken but not shown in --help (`one_of`)."""
    return typer.Option(name, hidden=True)


T = TypeVar("T")


def one_of(option: str, value: T | None, old_name: str, old: T | None) -> T | None:
    """An option's value, given under its name or under its old one (a hidden alias);
    `UsageProblem` if both are given."""
    if value is not None and old is not None:
        raise UsageProblem(option, f"given twice (also as {old_name}, its old name)")
    return value if value is not None else old


def required(option: str, value: T | None, metavar: str) -> T:
    """The value of a required option that has a hidden alias (so Typer cannot require
    it); `UsageProblem` if it is missing."""
    if value is None:
        raise UsageProblem(option, f"missing; give {option} {metavar}")
    return value


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # NaN, Infinity: taken as text


def parse_meta(items: list[str] | None) -> dict[str, Any] | None:
    """`--meta KEY=JSON` options as a metadata filter: the value is JSON where it reads as
    JSON (`n=3`, `tags=["vip"]`, `ok=true`), else the text itself (`title=Oslo trip`);
    `UserError` for an item without `=` or with an empty key."""
    if not items:
        return None
    meta: dict[str, Any] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise UsageProblem("--meta", f"{item!r} is not KEY=JSON (such as title=Oslo or n=3)")
        try:
            meta[name] = json.loads(value, parse_constant=_not_json)
        except ValueError:
            meta[name] = value
    return meta


def parse_time(field: str, text: str | None) -> datetime | None:
    """An ISO-8601 time (UTC when it has no offset), or a duration ago (`30d`, `12h`), as
    an aware time in UTC; `UserError` naming `field` for anything else, a time beyond
    the years 1 to 9999 in UTC included."""
    if text is None:
        return None
    ago = parse_duration_or_none(field, text)
    if ago is not None:
        return datetime.now(UTC) - ago
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageProblem(
            field, f"{text!r} is neither an ISO-8601 time nor a duration like 30d"
        ) from None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise UsageProblem(field, f"{text!r} is outside the years 1 to 9999 in UTC") from None


# ASCII digits only, as for ids; the whole text must match (`$` would let a newline by).
_DURATION = re.compile(r"\s*([0-9]+)\s*([smhdw])\s*")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration_or_none(field: str, text: str) -> timedelta | None:
    """The duration `text` spells (`90s`, `45m`, `12h`, `30d`, `2w`), or None if it
    spells none; `UserError` naming `field` if it reaches back before the year 1, so
    that the time that long ago can always be computed."""
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    amount, unit = match.groups()
    try:
        found = timedelta(**{_UNITS[unit]: int(amount)})
    except (OverflowError, ValueError):  # beyond timedelta, or too many digits for int()
        found = None
    if found is None or found > longest_ago():
        raise UsageProblem(
            field, f"{text!r} is too long: at most {longest_ago().days:,} days (back to the year 1)"
        )
    return found


def longest_ago() -> timedelta:
    """How far back a time can go from now: Python's times begin with the year 1."""
    return datetime.now(UTC) - datetime.min.replace(tzinfo=UTC)


def parse_duration(field: str, text: str) -> timedelta:
    """A positive duration that reaches back no further than the year 1; `UserError`
    naming `field` otherwise."""
    found = parse_duration_or_none(field, text)
    if found is None or found <= timedelta(0):
        raise UsageProblem(field, f"{text!r} is not a duration like 90s, 45m, 12h, 30d or 2w")
    return found


def session_filter(
    agent_id: str | None,
    channel: str | None,
    account_id: str | None,
    peer_kind: PeerKind | None,
    peer_id: str | None,
    status: SessionStatus | None,
    created_after: str | None,
    created_before: str | None,
    updated_after: str | None,
    updated_before: str | None,
    meta: list[str] | None = None,
    parent_id: int | None = None,
) -> dict[str, Any]:
    """The `SessionFilter` fields the options set."""
    fields: dict[str, Any] = {
        "agent_id": agent_id,
        "channel": channel,
        "account_id": account_id,
        "peer_kind": peer_kind,
        "peer_id": peer_id,
        "status": status,
        "created_after": parse_time("--created-after", created_after),
        "created_before": parse_time("--created-before", created_before),
        "updated_after": parse_time("--updated-after", updated_after),
        "updated_before": parse_time("--updated-before", updated_before),
        "meta": parse_meta(meta),
        "parent_id": parent_id,
    }
    return {name: value for name, value in fields.items() if value is not None}


FIRST_PAGE = "first"
"""The `--cursor` value that asks for the first page (and its cursor)."""


@sessions_app.command("list", cls=_Command)
@friendly
def list_sessions(
    ctx: typer.Context,
    agent_id: AgentOption = None,
    channel: ChannelOption = None,
    account_id: AccountOption = None,
    peer_kind: PeerKindOption = None,
    peer_id: PeerOption = None,
    parent_id: ParentOption = None,
    status: StatusOption = None,
    created_after: CreatedAfter = None,
    created_before: CreatedBefore = None,
    updated_after: UpdatedAfter = None,
    updated_before: UpdatedBefore = None,
    meta: MetaOption = None,
    limit: Annotated[int, integer_option(0, "At most this many.")] = 50,
    offset: Annotated[int, integer_option(0, "Skip this many first.")] = 0,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide", help="Every column (tokens, input, output), however narrow the terminal."
        ),
    ] = False,
    cursor: Annotated[
        str | None,
        typer.Option(
            "--cursor",
            metavar="CURSOR",
            help="The page after the one that printed this cursor (`first`: the first "
            "page); every page costs the same however deep.",
        ),
    ] = None,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Sessions matching the filters, most recently updated first. TIME is an ISO-8601
    time (UTC when it has no offset) or a duration ago, such as 30d. When more match,
    the next page's cursor is printed (with --cursor and --json, as `next_cursor`)."""
    from aisopod_session.transfer import session_json

    wanted = session_filter(
        agent_id,
        channel,
        account_id,
        peer_kind,
        peer_id,
        status,
        created_after,
        created_before,
        updated_after,
        updated_before,
        meta,
        parent_id=parent_id,
    )
    if cursor is not None and offset:
        raise UsageProblem("--cursor", "give --cursor or --offset, not both")
    if cursor is not None and limit == 0:
        raise UsageProblem("--limit", "must be at least 1 with --cursor")
    next_cursor = None
    with repository(target_of(ctx, db)) as repo:
        if offset or limit == 0:
            found = repo.list_sessions(wanted, limit=limit, offset=offset)
        else:
            try:
                page = repo.page_sessions(
                    wanted, limit=limit, cursor=None if cursor in (None, FIRST_PAGE) else cursor
                )
            except ValueError as exc:
                if not str(exc).startswith("cursor: "):
                    raise
                # A cursor that is no cursor (or another filter's) is a bad option value.
                raise UsageProblem("--cursor", str(exc).removeprefix("cursor: ")) from None
            found, next_cursor = page.sessions, page.next_cursor
        total = repo.count_sessions(wanted)
    if wants_json(ctx, json_output):
        listed = [session_json(session) for session in found]
        if cursor is None:
            print_json(listed)
        else:
            print_json({"sessions": listed, "next_cursor": next_cursor})
        return
    rows = [
        {
            "id": str(session.id),
            "key": str(session.key),
            "status": session.status.value,
            "messages": f"{session.message_count:,}",
            "tokens": f"{session.token_usage:,}",
            "input": f"{session.input_tokens:,}",
            "output": f"{session.output_tokens:,}",
            "updated (UTC)": when(session.updated_at),
        }
        for session in found
    ]
    table, needed = fitting_table(rows, LIST_COLUMNS, width=None if wide else out.width)
    if wide:  # as wide as the table needs, the terminal folding the lines if it must
        console = real_console(out)
        console.width = max(console.width, needed)
    out.print(table)
    if cursor is None or cursor == FIRST_PAGE:
        shown = f"{offset + 1}–{offset + len(found)}" if found else "none"
        out.print(f"{total:,} session(s) match; showing {shown}.")
    else:
        out.print(f"{total:,} session(s) match; showing {len(found):,} after the cursor.")
    if next_cursor is not None:
        out.print(f"Next page: --cursor {next_cursor}")


SEARCH_COLUMNS = ("key", "id", "time (UTC)", "role", "snippet")

LIST_COLUMNS = (
    ("id", "key", "status", "messages", "tokens", "input", "output", "updated (UTC)"),
    ("id", "key", "status", "messages", "tokens", "updated (UTC)"),
    ("id", "key", "messages", "updated (UTC)"),
    ("id", "key", "updated (UTC)"),
)
"""The columns of `sessions list`, widest first: the first set that fits is printed."""


def fitting_table(
    rows: list[dict[str, str]], choices: tuple[tuple[str, ...], ...], width: int | None
) -> Any:
    """A table of `rows` with the first set of columns in `choices` whose cells all fit
    in `width` columns unwrapped (every set when `width` is None): the key and the times
    are never cut nor wrapped. If even the last set does not fit (a key wider than the
    terminal), the key is folded onto further lines, whole. Also how wide the table is
    unfolded."""
    from rich.cells import cell_len
    from rich.table import Table

    def natural(columns: tuple[str, ...]) -> int:
        cells = sum(
            max([cell_len(name)] + [cell_len(row[name]) for row in rows]) for name in columns
        )
        return cells + 3 * len(columns) + 1  # padding of one each side, and the rules

    columns = choices[0]
    if width is not None:
        columns = next((c for c in choices if natural(c) <= width), choices[-1])
    table = Table()
    for name in columns:
        fold = name == "key" and width is not None and natural(columns) > width
        table.add_column(name, no_wrap=not fold, overflow="fold")
    for row in rows:
        table.add_row(*(row[name] for name in columns))
    return table, natural(columns)


ROLE_STYLES = {
    Role.USER: "bold cyan",
    Role.ASSISTANT: "bold green",
    Role.SYSTEM: "bold yellow",
    Role.DEVELOPER: "bold blue",
    Role.TOOL: "bold magenta",
}


@sessions_app.command("show", cls=_Command)
@friendly
def show(
    ctx: typer.Context,
    session: KeyOrId,
    last: Annotated[int | None, integer_option(1, "Only the newest N messages.", "--last")] = None,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """A session's transcript: every message (or the newest N), roles coloured, content
    blocks and tool calls spelled out."""
    from aisopod_session.transfer import session_json

    with repository(target_of(ctx, db)) as repo:
        found = find_session(repo, session)
        messages = repo.get_history(found.key, limit=last)
    if wants_json(ctx, json_output):
        print_json(
            {"session": session_json(found), "messages": [message_json(m) for m in messages]}
        )
        return
    # Three short lines, not one of 140 characters: each fits 80 columns (but for the key).
    out.print(f"Session #{found.id} {found.key} ({found.status.value})")
    out.print(
        f"{found.message_count:,} messages, {found.token_usage:,} tokens "
        f"({found.input_tokens:,} input, {found.output_tokens:,} output)"
    )
    out.print(f"created {when(found.created_at)}, updated {when(found.updated_at)}")
    if found.meta:
        out.print(f"metadata: {one_line_json(found.meta)}")
    if last is not None and found.message_count > len(messages):
        out.print(f"(the newest {len(messages)} of {found.message_count:,})")
    for message in messages:
        print_message(message)


# Under a message's first line: its further content blocks, its metadata, its tool calls.
_BLOCK_INDENT = " " * 13
_NOTE_INDENT = " " * 11


def print_message(message: Message) -> None:
    """One message of a transcript: `[id] time role: content`, then one line per further
    content block, `↳ meta` and one `↳ tool call` per call. Every piece is a plain string,
    so `_Console.render_str` escapes it (`terminal_safe`); stored text is also escaped
    for Rich's markup, which only the first line uses."""
    from rich.markup import escape

    role = message.role
    if isinstance(role, Role):
        style = ROLE_STYLES.get(role, "bold")
        shown_role = f"[{style}]{role.value:>9}[/{style}]"
    else:  # a role another program wrote: shown as it is, uncoloured
        shown_role = escape(f"{role:>9}")
    first, *rest = content_pieces(message.content)
    out.print(
        f"[dim]\\[{message.id}] {message.created_at:%H:%M:%S}[/dim] {shown_role}: {escape(first)}",
        markup=True,
    )
    for piece in rest:
        out.print(_BLOCK_INDENT + piece)
    if message.meta:
        out.print(f"{_NOTE_INDENT}↳ meta {one_line_json(message.meta)}")
    for call in tool_call_list(message.tool_calls):
        out.print(f"{_NOTE_INDENT}↳ tool call {indented_json(call)}")


def content_pieces(content: Any) -> list[str]:
    """How a message's content reads in a transcript, one piece per content block (at
    least one): text as it is (its newlines kept), a list of content blocks block by
    block (`block_text`), any other JSON value (an object, a number, true, null) as
    JSON."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list) and content:
        return [block_text(block) for block in content]
    return [indented_json(content)]


# The transcript labels tool use and tool result blocks too, on one line each.
_LABELS = {
    **MEDIA_LABELS,
    **dict.fromkeys(TOOL_RESULT, "tool_result"),
    **dict.fromkeys(TOOL_USE, "tool_use"),
}
_SHORT = 120
"""The most characters of a labelled block's detail shown."""


def block_text(block: Any) -> str:
    """One content block as a transcript shows it: a text block (or a plain string) as
    its text; an image, file, audio, tool result, tool use, reasoning or refusal block
    as one short labelled line (`[image: https://…]`); anything else as one-line JSON."""
    if isinstance(block, str):
        return block
    if isinstance(block, dict):
        kind = block.get("type")
        if kind in TEXT_BLOCKS and isinstance(block.get("text"), str):
            return str(block["text"])
        label = _LABELS.get(kind) if isinstance(kind, str) else None
        if label is not None:
            return labelled(label, block)
    return one_line_json(block)


def labelled(label: str, block: dict[str, Any]) -> str:
    """`[label name: detail]` for a block `block_text` knows, name and detail cut short."""
    name: str | None
    if label == "tool_result":
        name = _first_text(block, "tool_use_id", "call_id", "id")
        inner = block.get("content", block.get("output"))
        detail = inner if isinstance(inner, str) else _joined(inner)
        if block.get("is_error") is True:
            label += f" {short(name)}, error" if name else " error"
            name = None
    elif label == "tool_use":
        name = " ".join(filter(None, (_first_text(block, "name"), _first_text(block, "id"))))
        arguments = block.get("input", block.get("arguments"))
        detail = arguments if isinstance(arguments, str) else _json_or_none(arguments)
    elif label == "reasoning":
        name = None
        detail = (
            "redacted"
            if block.get("type") == "redacted_thinking"
            else _first_text(block, "thinking", "text") or _joined(block.get("summary"))
        )
    elif label == "refusal":
        name, detail = None, _first_text(block, "refusal", "text")
    else:  # image, file, audio: where it is, or what it is
        name, detail = None, _source_of(block)
    head = f"{label} {short(name)}" if name else label
    return f"[{head}: {short(detail)}]" if detail else f"[{head}]"


def _source_of(block: dict[str, Any]) -> str | None:
    """Where an image, file or audio block's data is (a file name, a URL, a file id) or
    else its media type: in the block or in the object under its type or `source`."""
    places = [block]
    for name in (str(block.get("type")), "source", "file", "image_url", "input_audio"):
        inner = block.get(name)
        if isinstance(inner, dict):
            places.append(inner)
        elif isinstance(inner, str) and name in ("image_url", "file"):
            places.append({"url": inner})
    for key in (
        "filename",
        "url",
        "file_url",
        "image_url",
        "file_id",
        "media_type",
        "mime_type",
        "format",
    ):
        for place in places:
            value = place.get(key)
            if isinstance(value, str) and value:
                if value.startswith("data:"):  # inline data: only its media type
                    media = value[5:].split(",", 1)[0].split(";", 1)[0]
                    return f"{media or 'inline'} data"
                return value
    return None


def _first_text(block: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = block.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _joined(value: Any) -> str | None:
    """Nested content (a list of blocks, say) as one text; None for nothing."""
    if value is None or value == []:
        return None
    if isinstance(value, list):
        return " ".join(block_text(item) for item in value)
    return block_text(value)


def _json_or_none(value: Any) -> str | None:
    return None if value is None else one_line_json(value)


def short(text: str) -> str:
    """`text` on one line (runs of spaces, tabs and newlines as one space), at most `_SHORT`
    characters (cut with `…`)."""
    # Only these: `str.split()` would also take C1's NEL and the C0 separators for
    # white space, and drop them instead of showing them escaped.
    flat = re.sub(r"[ \t\n]+", " ", text).strip(" ")
    return flat if len(flat) <= _SHORT else flat[: _SHORT - 1] + "…"


def one_line_json(value: Any) -> str:
    """`value` as JSON on one line, non-ASCII text readable."""
    return json.dumps(value, ensure_ascii=False)


def indented_json(value: Any) -> str:
    """`value` as indented JSON whose lines after the first line up under a transcript's
    notes (JSON text holds no raw newline of its own: its strings escape them)."""
    text = json.dumps(value, ensure_ascii=False, indent=2)
    return text.replace("\n", "\n" + _BLOCK_INDENT)


def message_json(message: Message) -> dict[str, Any]:
    """A message as `sessions show --json` prints it: `content` and `tool_calls` as the
    JSON values they are, `metadata` the message's metadata object."""
    from aisopod_session.models import utc_text

    return {
        "id": message.id,
        "session_id": message.session_id,
        "role": str(message.role),
        "content": message.content,
        "tool_calls": message.tool_calls,
        "metadata": message.meta,
        "created_at": utc_text(message.created_at),
    }


YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", "--force", help="Replace what the target holds.")
]


def confirm(question: str, yes: bool) -> None:
    """Ask on a terminal unless --yes, and abort on anything but yes; scripts (no
    terminal) are not asked. The question's stored text is escaped (`terminal_safe`)."""
    if yes or not on_terminal():
        return
    if not typer.confirm(terminal_safe(question), default=False):
        raise typer.Abort()


def on_terminal() -> bool:
    """Whether someone can answer a question: stdin is a terminal."""
    return sys.stdin.isatty()


@sessions_app.command("delete", cls=_Command)
@friendly
def delete(
    ctx: typer.Context,
    session: KeyOrId,
    yes: YesOption = False,
    db: DbOption = None,
) -> None:
    """Delete a session and its messages."""
    from aisopod_session.errors import SessionNotFoundError

    with repository(target_of(ctx, db)) as repo:
        found = find_session(repo, session)
        confirm(
            f"Delete session #{found.id} {found.key} and its {found.message_count} messages?", yes
        )
        if not repo.delete(found.key):
            raise SessionNotFoundError(f"no session for key {found.key}")
    out.print(f"Deleted session #{found.id} {found.key} ({found.message_count:,} messages).")


@sessions_app.command("fork", cls=_Command)
@friendly
def fork(
    ctx: typer.Context,
    session: Annotated[
        str,
        typer.Argument(
            metavar="KEY-OR-ID",
            help="The session to copy: its id (digits) or its key "
            "(agent:channel:account:peer_kind:peer).",
        ),
    ],
    new_key: Annotated[str, typer.Argument(metavar="NEW_KEY", help="The new session's key.")],
    up_to: Annotated[
        int | None,
        integer_option(0, "Copy the messages up to this message id.", "--up-to", metavar="ID"),
    ] = None,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Branch a conversation: a new session NEW_KEY holding a copy of the session's
    messages (up to and including message ID with --up-to). The source is not changed."""
    from aisopod_session.keys import SessionKey
    from aisopod_session.transfer import session_json

    try:
        target = SessionKey.parse(new_key)
    except ValueError as exc:
        raise UsageProblem(
            "NEW_KEY",
            f"{new_key!r} is not a key (agent:channel:account:kind:peer): {one_line(exc)}",
        ) from None
    with repository(target_of(ctx, db)) as repo:
        found = find_session(repo, session)
        forked = repo.fork(found.key, target, up_to_id=up_to)
    if wants_json(ctx, json_output):
        print_json(session_json(forked))
        return
    last = forked.forked_from_message_id
    upto = "" if last is None else f", up to message #{last}"
    out.print(
        f"Forked session #{found.id} {found.key} into #{forked.id} {forked.key} "
        f"({forked.message_count:,} messages{upto})."
    )


def compact(
    ctx: typer.Context,
    session: KeyOrId,
    last: Annotated[
        int | None, integer_option(0, "The newest N messages to keep (required).", "--last")
    ] = None,
    keep_last_old: Annotated[int | None, integer_option(0, "", "--keep-last", hidden=True)] = None,
    summary: Annotated[
        str | None,
        typer.Option("--summary", metavar="TEXT", help="A system message in place of the rest."),
    ] = None,
    yes: YesOption = False,
    db: DbOption = None,
) -> None:
    """Keep the newest N messages of a session, optionally replacing the rest with a
    summary."""
    keep_last = required("--last", one_of("--last", last, "--keep-last", keep_last_old), "N")
    with repository(target_of(ctx, db)) as repo:
        found = find_session(repo, session)
        if found.message_count > keep_last:  # otherwise nothing would change
            confirm(
                f"Keep only the newest {keep_last} of the {found.message_count} messages of "
                f"#{found.id} {found.key}, deleting the other "
                f"{found.message_count - keep_last}?",
                yes,
            )
        result = repo.compact(found.key, keep_last=keep_last, summary=summary)
    out.print(
        f"Compacted #{found.id}: removed {result.removed:,} message(s), "
        f"{result.message_count:,} left"
        + (", summary added" if result.summary is not None else "")
        + f" (compaction {result.compaction_count})."
    )


def reset(
    ctx: typer.Context,
    session: KeyOrId,
    yes: YesOption = False,
    db: DbOption = None,
) -> None:
    """Delete every message of a session and start it afresh under the same key."""
    with repository(target_of(ctx, db)) as repo:
        found = find_session(repo, session)
        confirm(f"Delete the {found.message_count} messages of #{found.id} {found.key}?", yes)
        repo.reset(found.key)
    out.print(f"Reset #{found.id} {found.key}: {found.message_count:,} message(s) deleted.")


for command in (compact, reset):
    app.command(command.__name__, cls=_Command)(friendly(command))
    sessions_app.command(command.__name__, cls=_Command)(friendly(command))


@friendly
def prune(
    ctx: typer.Context,
    updated_before: Annotated[
        str | None,
        typer.Option(
            "--updated-before",
            metavar="TIME",
            help="Delete the sessions last updated before TIME (required): ISO-8601 (UTC "
            "without an offset) or a duration ago on the store's clock: 90s, 45m, 12h, 30d, "
            "2w.",
        ),
    ] = None,
    older_than: Annotated[str | None, hidden("--older-than")] = None,
    status: StatusOption = None,
    agent_id: AgentOption = None,
    meta: MetaOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count them.")] = False,
    yes: YesOption = False,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete sessions not updated since a time, with their messages, in short batches."""
    option = "--updated-before" if older_than is None else "--older-than"
    text = required(
        "--updated-before",
        one_of("--updated-before", updated_before, "--older-than", older_than),
        "TIME",
    )
    age = parse_duration_or_none(option, text)
    if age is not None and age <= timedelta(0):
        raise UsageProblem(option, f"{text!r}: a duration ago must be longer than 0")
    when_given = None if age is not None else parse_time(option, text)
    wanted = {"meta": parse_meta(meta)}
    with repository(target_of(ctx, db)) as repo:
        # The store's clock (the server's on PostgreSQL), not this host's, says what is old.
        before = when_given if age is None else ago(option, repo.now(), age)
        assert before is not None
        scoped = repo if agent_id is None else repo.for_agent(agent_id)
        count = scoped.prune(updated_before=before, status=status, filter=wanted, dry_run=True)
        if not dry_run and count:
            confirm(f"Delete {count} session(s) not updated since {when(before)}?", yes)
            with progress_bar(
                "pruning", count, "sessions", hide=wants_json(ctx, json_output)
            ) as report:
                count = scoped.prune(
                    updated_before=before, status=status, filter=wanted, on_batch=report
                )
    if wants_json(ctx, json_output):
        print_json({"dry_run": dry_run, "sessions": count, "updated_before": before.isoformat()})
        return
    verb = "Would delete" if dry_run else "Deleted"
    out.print(f"{verb} {count:,} session(s) not updated since {when(before)}.")


@friendly
def mark_idle(
    ctx: typer.Context,
    idle_for: Annotated[
        str,
        typer.Option(
            "--idle-for",
            metavar="DURATION",
            help="Not updated for this long: 90s, 45m, 12h, 30d, 2w.",
        ),
    ],
    db: DbOption = None,
) -> None:
    """Mark idle every active session not updated for a while."""
    duration = parse_duration("--idle-for", idle_for)
    with repository(target_of(ctx, db)) as repo:
        count = repo.mark_idle(idle_for=duration)
    out.print(f"Marked {count:,} session(s) idle.")


# The lifecycle commands, at the top level and under `sessions` alike.
for lifecycle, name in ((prune, "prune"), (mark_idle, "mark-idle")):
    app.command(name, cls=_Command)(lifecycle)
    sessions_app.command(name, cls=_Command)(lifecycle)


# --- export, import, copy -----------------------------------------------------------------


@contextmanager
def progress_bar(
    label: str, total: int | None, unit: str, *, hide: bool = False
) -> Iterator[Callable[[int], object]]:
    """A progress bar on stderr when it is a terminal (and not `hide`, as for --json): done
    of `total` `unit`, the rate and the time elapsed and left. Elsewhere, nothing."""
    if hide or not err.is_terminal:
        yield lambda _: None
        return
    with _bar(label, total, unit) as (bar, task):
        yield lambda done: bar.update(task, completed=done)


@contextmanager
def _bar(label: str, total: int | None, unit: str) -> Iterator[tuple[Any, Any]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """`1,234 messages/s`, once Rich has measured it."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} {unit}/s")

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=real_console(err), transient=True) as bar:
        yield bar, bar.add_task(label, total=total)


@app.command("search", cls=_Command)
@friendly
def search(
    ctx: typer.Context,
    words: Annotated[
        str,
        typer.Argument(
            metavar="WORDS",
            help='What to find: every word must appear; "quoted words" together.',
        ),
    ],
    agent_id: AgentOption = None,
    channel: ChannelOption = None,
    account_id: AccountOption = None,
    peer_kind: PeerKindOption = None,
    peer_id: PeerOption = None,
    parent_id: ParentOption = None,
    status: StatusOption = None,
    created_after: CreatedAfter = None,
    created_before: CreatedBefore = None,
    updated_after: UpdatedAfter = None,
    updated_before: UpdatedBefore = None,
    meta: MetaOption = None,
    role: Annotated[
        list[Role] | None,
        typer.Option(
            "--role",
            parser=choice(Role),
            metavar="ROLE",
            help=f"Only messages of this role ({values_of(Role)}); repeatable.",
        ),
    ] = None,
    limit: Annotated[int, integer_option(0, "At most this many hits.")] = 20,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Messages whose text holds WORDS, best first, in the sessions matching the filters
    (those of `sessions list`): each with its session's key, its id, time and a snippet
    with the words marked «like this»."""

    from aisopod_session.models import utc_text

    wanted = session_filter(
        agent_id,
        channel,
        account_id,
        peer_kind,
        peer_id,
        status,
        created_after,
        created_before,
        updated_after,
        updated_before,
        meta,
        parent_id=parent_id,
    )
    with repository(target_of(ctx, db)) as repo:
        hits = repo.search_messages(words, filter=wanted, roles=role or None, limit=limit)
    if wants_json(ctx, json_output):
        print_json(
            [
                {
                    "key": str(hit.key),
                    "session_id": hit.message.session_id,
                    "id": hit.message.id,
                    "role": str(hit.message.role),
                    "created_at": utc_text(hit.message.created_at),
                    "snippet": hit.snippet,
                    "rank": hit.rank,
                }
                for hit in hits
            ]
        )
        return
    rows = [
        {
            "key": str(hit.key),
            "id": str(hit.message.id),
            "time (UTC)": when(hit.message.created_at),
            "role": str(hit.message.role),
            "snippet": " ".join(hit.snippet.split()),
        }
        for hit in hits
    ]
    table, needed = fitting_table(rows, (tuple(SEARCH_COLUMNS),), width=None)
    if needed <= out.width:
        out.print(table)
    else:
        # Too narrow for a table (snippets are long): each hit as a line naming it whole,
        # then its snippet, indented, wrapped by the terminal.
        for row in rows:
            out.print(f"{row['key']} #{row['id']} {row['time (UTC)']} {row['role']}")
            out.print(f"    {row['snippet']}")
    out.print(f"{len(hits):,} hit(s), best first." if hits else "No message matches.")


@app.command("export", cls=_Command)
@friendly
def export(
    ctx: typer.Context,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="FILE", help="Where to write; - (the default) is stdout."),
    ] = None,
    out_old: Annotated[str | None, typer.Option("--out", "-o", hidden=True)] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", "--force", help="Replace an existing FILE without asking."),
    ] = False,
    agent_id: AgentOption = None,
    channel: ChannelOption = None,
    account_id: AccountOption = None,
    peer_kind: PeerKindOption = None,
    peer_id: PeerOption = None,
    parent_id: ParentOption = None,
    status: StatusOption = None,
    created_after: CreatedAfter = None,
    created_before: CreatedBefore = None,
    updated_after: UpdatedAfter = None,
    updated_before: UpdatedBefore = None,
    meta: MetaOption = None,
    db: DbOption = None,
) -> None:
    """Write sessions and their messages as JSON Lines, one object per line, streaming.
    The filters are those of `sessions list`."""
    from aisopod_session.transfer import count_export, export_jsonl

    wanted = session_filter(
        agent_id,
        channel,
        account_id,
        peer_kind,
        peer_id,
        status,
        created_after,
        created_before,
        updated_after,
        updated_before,
        meta,
        parent_id=parent_id,
    )
    out_path = one_of("--to", to, "--out", out_old) or "-"
    option = "--to" if out_old is None else "--out"
    target = target_of(ctx, db)
    if out_path != "-":
        refuse_store_file(
            f"{option} {out_path}", Path(out_path), target, "the export would overwrite the store"
        )
        refuse_to_replace(option, Path(out_path), overwrite)
    with repository(target) as repo:
        engine = repo.engine
        sessions, messages = count_export(engine, wanted)
        with (
            progress_bar("exporting", sessions + messages, "lines") as report,
            open_output(out_path) as stream,
        ):
            result = export_jsonl(engine, stream, wanted, progress=report)
    where = "stdout" if out_path == "-" else out_path
    err.print(
        f"Exported {result.sessions:,} session(s) and {result.messages:,} message(s) to {where}."
    )
    if result.damaged:
        # Each was named in a warning above; the export is not whole, so the status says so.
        err.print(
            f"Left out {len(result.damaged):,} damaged row(s) and the "
            f"{result.skipped_messages:,} message(s) of the sessions among them.",
            style="red",
        )
        raise typer.Exit(1)


def refuse_to_replace(option: str, file: Path, overwrite: bool) -> None:
    """Nothing if `file` does not exist or `overwrite`; else ask on a terminal (abort on
    no), and without one a `UserError`: an export never replaces a file unasked."""
    if overwrite or not (file.exists() or file.is_symlink()):
        return
    if file.is_dir():
        raise UserError(f"{option} {file}: is a folder; name a file")
    if not on_terminal():
        raise UserError(f"{option} {file}: the file exists; pass --overwrite to replace it")
    if not typer.confirm(terminal_safe(f"Replace {file}?"), default=False):
        raise typer.Abort()


@contextmanager
def open_output(path: str) -> Iterator[TextIO]:
    """The export's stream: stdout through `json_safe` (it may be a terminal; the JSON
    it carries means the same), or for a file a temporary file beside it, which takes
    its name only once the export is whole and on disk: an export interrupted (Ctrl-C,
    SIGTERM) or failed (a full disk) leaves no part of itself behind, and a file it was
    to replace as it was. Through a symbolic link, the file it names is replaced,
    keeping its mode and group. The file is written in place, as `open` would, where a
    replacement would change more than its content: a device, FIFO or pipe
    (`/dev/stdout`, whatever it is open on), a file with other hard links, extended
    attributes (an ACL) or another owner, one this process may not write, a group this
    process cannot give, a folder where no temporary file can be made or that gives new
    files attributes (a default ACL) the file lacks."""
    if path == "-":
        if sys.stdout is None:
            raise UserError("standard output is closed: name a file with --to")
        # export_jsonl only writes to its stream.
        yield cast(TextIO, _JsonSafeWriter(sys.stdout))
        sys.stdout.flush()
        return
    with _terminated_as_exit():
        part = _temporary_beside(path)
        if part is None:
            with open(path, "w", encoding="utf-8", newline="\n") as stream:
                yield stream
            return
        descriptor, temporary, target = part
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def _temporary_beside(path: str) -> tuple[int, str, str] | None:
    """A new temporary file (descriptor, its path, and the path it will replace) in the
    folder of the file `path` names: made as `open` makes a new file (the umask, or the
    folder's default ACL, decides its mode), then given the mode and group of the file
    it will replace; None where the export is to be written in place (`open_output`)."""
    import secrets

    if path.endswith((os.sep, os.altsep or os.sep)):
        return None  # `open` says that a folder is meant
    if _names_a_descriptor(path):
        return None
    try:
        found: os.stat_result | None = os.stat(path)  # through symbolic links
    except FileNotFoundError:
        found = None
    except OSError:
        return None  # a link loop, no access: `open` says what
    if found is not None and not (
        stat.S_ISREG(found.st_mode)
        and found.st_nlink == 1
        and found.st_uid == os.geteuid()
        and os.access(path, os.W_OK)
        and not _extended_attributes(path)  # an ACL among them
    ):
        return None
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(10):
        temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}")
        try:
            descriptor = os.open(temporary, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError:
            return None
    else:
        return None
    try:
        if found is not None:
            # What the folder gave the new file (a default ACL) the file it replaces
            # lacks (it has no extended attribute: checked above).
            if _extended_attributes(temporary):
                raise OSError("the folder gives new files attributes the file lacks")
            os.fchmod(descriptor, stat.S_IMODE(found.st_mode))
            if os.fstat(descriptor).st_gid != found.st_gid:
                os.fchown(descriptor, -1, found.st_gid)
    except BaseException as exc:  # SIGTERM too: the temporary file goes
        os.close(descriptor)
        os.unlink(temporary)
        if isinstance(exc, OSError):
            return None
        raise
    return descriptor, temporary, target


def _names_a_descriptor(path: str) -> bool:
    """Whether `path`, or a symbolic link it leads through, is under /dev or /proc
    (`/dev/stdout`, `/dev/fd/3`): a descriptor the shell opened, which is written
    through, never replaced, whatever file it is open on."""
    current = os.path.abspath(path)
    for _ in range(40):
        if current.startswith(("/dev/", "/proc/")):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    return False


def _extended_attributes(path: str) -> bool:
    """Whether the file has extended attributes (an ACL is one), which a new file would
    not get: False where the file system has none."""
    try:
        return bool(os.listxattr(path))
    except (OSError, AttributeError):
        return False


@contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM, while the block runs in the main thread, ends the command as an
    exception would (exit status 143), so that the block's clean-up runs; Python's
    default is to die at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command("import", cls=_Command)
@friendly
def import_(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(metavar="FILE.jsonl", help="An export; - is stdin.")],
    batch_size: Annotated[int, integer_option(1, "Lines per transaction.")] = 1000,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Import an export: every line validated, written in batches, idempotent. Bad lines
    are reported (number and reason) and skipped; the exit status is then 1."""
    from aisopod_session.transfer import import_jsonl

    target = target_of(ctx, db)
    total = None
    if file != "-":
        refuse_store_file(
            file, Path(file), target, "a store cannot be imported into itself; import an export"
        )
        if Path(file).is_dir():
            raise UserError(f"{file} is a folder: name an export file (FILE.jsonl)")
        if not Path(file).is_file():
            raise UserError(f"no file {file}")
        refuse_what_is_no_export(file)
        hide = wants_json(ctx, json_output) or not err.is_terminal
        total = None if hide else count_lines(file)
    with (
        # Standard input's first line is checked before the store is opened or created.
        open_input(file) as lines,
        opened(target, create=True, migrate=True) as engine,
        progress_bar("importing", total, "lines", hide=wants_json(ctx, json_output)) as report,
    ):
        result = import_jsonl(engine, lines, batch_size=batch_size, progress=report)
    for error in result.errors:
        err.print(f"line {error.line}: {error.reason}", style="red")
    if wants_json(ctx, json_output):
        print_json(
            {
                "sessions_created": result.sessions_created,
                "sessions_existing": result.sessions_existing,
                "messages_imported": result.messages_imported,
                "messages_existing": result.messages_existing,
                "errors": [{"line": e.line, "reason": e.reason} for e in result.errors],
            }
        )
    else:
        out.print(
            f"Imported {result.sessions_created:,} session(s) and "
            f"{result.messages_imported:,} message(s); already there: "
            f"{result.sessions_existing:,} session(s), {result.messages_existing:,} "
            f"message(s); refused: {len(result.errors):,} line(s)."
        )
    if result.errors:
        raise typer.Exit(1)


@app.command("import-openclaw", cls=_Command)
@friendly
def import_openclaw_command(
    ctx: typer.Context,
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="An OpenClaw state folder (~/.openclaw), one agents/AGENT folder, or one "
            "sessions folder.",
        ),
    ],
    agent: Annotated[
        list[str] | None,
        typer.Option(
            "--agent", metavar="AGENT", help="Import this agent only (repeat for several)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read everything, write nothing, report.")
    ] = False,
    archived: Annotated[
        bool,
        typer.Option(
            "--archived",
            help="Also import archived transcripts (.reset., .deleted., .bak.) as "
            "archived sessions.",
        ),
    ] = False,
    db: DbOption = None,
    json_output: JsonOption = False,
) -> None:
    """Import an OpenClaw gateway's sessions and transcripts (docs/openclaw.md). Each
    session is written whole in one transaction; running it again imports only what is
    new. Damaged files and lines are reported (path and line) and skipped; the exit
    status is then 1."""
    from tempfile import TemporaryDirectory

    from aisopod_session.openclaw import import_openclaw
    from aisopod_session.repository import SessionRepository

    target = target_of(ctx, db)
    if not Path(path).is_dir():
        raise UserError(f"no folder {path}")
    store_file = file_of(target)
    with ExitStack() as stack:
        if dry_run and store_file is not None and not store_file.exists():
            # A dry run creates nothing: with no store yet, it compares with an empty one.
            folder = stack.enter_context(TemporaryDirectory())
            target = str(Path(folder) / "dry-run.db")
        engine = stack.enter_context(opened(target, create=True, migrate=True))
        report = stack.enter_context(
            _counted_bar("importing", "sessions", hide=wants_json(ctx, json_output))
        )
        try:
            result = import_openclaw(
                path,
                SessionRepository(engine),
                agents=agent,
                dry_run=dry_run,
                progress=report,
                archived=archived,
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
    for problem in result.problems:
        err.print(terminal_safe(str(problem)), style="red")
    if wants_json(ctx, json_output):
        print_json(
            {
                "dry_run": result.dry_run,
                "sessions_created": result.sessions_created,
                "sessions_updated": result.sessions_updated,
                "sessions_unchanged": result.sessions_unchanged,
                "messages_imported": result.messages_imported,
                "messages_existing": result.messages_existing,
                "orphans": result.orphans,
                "aliases": result.aliases,
                "other_branches": result.other_branches,
                "forks_created": result.forks_created,
                "archived_imported": result.archived_imported,
                "archived_skipped": result.archived_skipped,
                "problems": [
                    {"path": p.path, "line": p.line, "reason": p.reason} for p in result.problems
                ],
            }
        )
    else:
        would = "Would import" if result.dry_run else "Imported"
        out.print(
            f"{would} {result.sessions_created:,} new session(s), updated "
            f"{result.sessions_updated:,} ({result.sessions_unchanged:,} unchanged); "
            f"{result.messages_imported:,} message(s) ({result.messages_existing:,} already "
            f"there); {result.orphans:,} transcript(s) without an entry; "
            f"{len(result.archived_skipped):,} archived transcript(s) skipped; "
            f"{result.forks_created:,} fork(s) of branches off the live ones; "
            f"problems: {len(result.problems):,}."
        )
    if result.problems:
        raise typer.Exit(1)


@contextmanager
def _counted_bar(
    label: str, unit: str, *, hide: bool = False
) -> Iterator[Callable[[int, int], object]]:
    """A progress bar on stderr (when it is a terminal, and not `hide`) told its total
    with each step."""
    if hide or not err.is_terminal:
        yield lambda done, total: None
        return
    with _bar(label, None, unit) as (bar, task):
        yield lambda done, total: bar.update(task, completed=done, total=total)


_PEEK = 1024 * 1024
"""How much of an import's first line is read to check that the file is an export."""


def refuse_what_is_no_export(file: str) -> None:
    """`UserError` if the first line of `file` that is not blank is not a line of an export
    (a header, a session or a message): a text file that is no export is refused before
    any store is opened or created."""
    with open(file, encoding="utf-8-sig", errors="surrogateescape") as stream:
        first_lines(stream, file)


def first_lines(stream: TextIO, name: str) -> list[str]:
    """The lines read from `stream` up to its first that is not blank, once that one has
    been found to be a line of an export (`refuse_what_is_no_export`), each whole;
    `UserError` naming `name` if it is not (a line over the import's `MAX_LINE_LENGTH`
    is not). Blank lines are read `_PEEK` characters at a time, the first other line
    whole: a file of one long line is checked like any other."""
    from aisopod_session.transfer import MAX_LINE_LENGTH, parse_line

    read: list[str] = []
    for number, start in enumerate(iter(lambda: stream.readline(_PEEK), ""), start=1):
        line = start
        if not line.endswith("\n") and len(line) >= _PEEK:
            line += stream.readline(MAX_LINE_LENGTH + 2 - len(line))
        read.append(line)
        if not line.strip():
            continue
        try:
            breaks = 2 if line.endswith("\r\n") else 1 if line.endswith("\n") else 0
            if len(line) - breaks > MAX_LINE_LENGTH:
                raise ValueError(f"longer than {MAX_LINE_LENGTH:,} characters")
            parse_line(line)
        except ValueError as exc:
            raise UserError(
                f"{name} is not an export (line {number}: {one_line(exc)}); nothing imported"
            ) from None
        break
    return read


class _Replayed:
    """Standard input whose first lines were read already to check them (`first_lines`):
    they come back first, then the rest, a line at most `limit` characters at a time as
    the import reads a stream."""

    def __init__(self, read: list[str], rest: TextIO) -> None:
        self._read = read
        self._rest = rest

    def readline(self, limit: int = -1) -> str:
        if self._read:
            return self._read.pop(0)  # whole, and at most the import's line limit
        return self._rest.readline(limit)

    def __iter__(self) -> Iterator[str]:
        return iter(self.readline, "")


def count_lines(file: str) -> int:
    """The lines in `file` (the import's progress bar total), read in binary chunks."""
    lines = 0
    last = b"\n"
    with open(file, "rb") as stream:
        while chunk := stream.read(1024 * 1024):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


@contextmanager
def open_input(path: str) -> Iterator[Any]:
    if path == "-":
        sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
        yield _Replayed(first_lines(sys.stdin, "standard input"), sys.stdin)
        return
    # A BOM is skipped; bytes that are not UTF-8 reach the line's checks (and are refused
    # there, with the line's number) instead of stopping the import.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as stream:
        yield stream


@app.command("copy", cls=_Command)
@friendly
def copy(
    ctx: typer.Context,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="PATH-OR-URL", help="The target store (required)."),
    ] = None,
    overwrite: OverwriteOption = False,
    db: DbOption = None,
) -> None:
    """Copy the whole store into another one (a SQLite file into PostgreSQL, say), ids
    included."""
    from aisopod_session.copying import copy_database
    from aisopod_session.repository import SessionRepository

    target_name = required("--to", to, "PATH-OR-URL")
    source = target_of(ctx, db)
    refuse_copy_into_itself(source, target_name)
    with repository(source) as repo:
        totals = repo.summary().total
        rows = totals.sessions + totals.messages
        with (
            opened(target_name, create=True, migrate=True) as target,
            progress_bar("copying", rows, "rows") as report,
        ):
            present = 0 if overwrite else SessionRepository(target).count_sessions()
            if present:
                raise UserError(
                    f"{shown_target(target_name)} already holds {present:,} session(s): pass "
                    "--overwrite to replace them"
                )
            copied: dict[str, int] = {}

            def progress(table: str, done: int, _total: int) -> None:
                copied[table] = done
                report(sum(copied.values()))

            result = copy_database(repo.engine, target, overwrite=overwrite, progress=progress)
    out.print(
        f"Copied {result.sessions:,} session(s) and {result.messages:,} message(s) "
        f"to {shown_target(target_name)}."
    )


def ago(option: str, now: datetime, age: timedelta) -> datetime:
    """`now - age`, or a `UsageProblem` naming `option` when that is before the year 1."""
    try:
        return now - age
    except OverflowError:
        raise UsageProblem(option, "reaches back before the year 1") from None


# --- the web viewer -------------------------------------------------------------------------

VIEWER_PORT = 8765


@app.command("serve")
@friendly
def serve(
    ctx: typer.Context,
    db: DbOption = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            metavar="ADDRESS",
            help="The address to listen on; anything but loopback needs the token.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            "--port", metavar="PORT", parser=whole_number(1, 65535), help="The port to listen on."
        ),
    ] = VIEWER_PORT,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="TEXT",
            envvar="AISOPOD_VIEWER_TOKEN",
            show_envvar=False,
            help="The token every request must carry [env AISOPOD_VIEWER_TOKEN]; made up "
            "and printed when the viewer listens beyond loopback without one.",
        ),
    ] = None,
) -> None:
    """Browse the store in a read-only web viewer (http://127.0.0.1:8765/ by default)."""
    if token is not None and not token.strip():
        raise UserError("--token: must not be empty")
    try:
        import uvicorn

        from aisopod_session.viewer import create_app, is_loopback
    except ImportError as exc:
        raise UserError(
            f"serve needs the `viewer` extra (FastAPI, Jinja2 and uvicorn; {exc.name} is "
            "missing): install aisopod-session[viewer]"
        ) from None
    if token is None and not is_loopback(host):
        import secrets

        token = secrets.token_urlsafe(24)
    target = target_of(ctx, db)
    with repository(target) as repo, listening(host, port) as sockets:
        shown_host = f"[{host}]" if ":" in host else host
        address = f"http://{shown_host}:{port}/"
        if token is not None:
            address += f"?token={token}"
        out.print(f"Serving {shown_target(target)} read-only at {address} (Ctrl-C stops).")
        # No websocket protocol: the viewer has no such route (and older uvicorns would
        # import a websockets module that warns).
        config = uvicorn.Config(create_app(repo, token=token), log_level="warning", ws="none")
        uvicorn.Server(config).run(sockets=sockets)


@contextmanager
def listening(host: str, port: int) -> Iterator[list[Any]]:
    """Listening sockets on every address `host` names (all of this machine's for
    ""), as asyncio's `create_server` makes them for uvicorn (an IPv6 one for IPv6
    alone), closed after the block; `UserError` in one line when one cannot be made
    (the port in use, no such address), before the viewer says it serves."""
    import socket

    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"--host {host}: no address to listen on ({reason})") from None
    sockets: list[Any] = []
    with ExitStack() as opened:
        for family, kind, protocol, _, address in dict.fromkeys(found):
            try:
                sock = opened.enter_context(socket.socket(family, kind, protocol))
            except OSError:
                continue  # a family this machine lacks (IPv6 turned off), as asyncio skips
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                # Listening here, not in uvicorn: two servers may bind one port with
                # SO_REUSEADDR, and only the second's listen() finds it taken.
                sock.listen(_BACKLOG)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UserError(
                        f"--port {port}: in use on {address[0]} (another server?); pass "
                        "another --port"
                    ) from None
                reason = exc.strerror or str(exc)
                raise UserError(
                    f"--host {host} --port {port}: cannot listen on {address[0]} ({reason})"
                ) from None
            sockets.append(sock)
        if not sockets:
            raise UserError(f"--host {host}: this machine cannot listen on any of its addresses")
        yield sockets


_BACKLOG = 2048
"""The listening sockets' backlog: uvicorn's default."""


def main() -> None:
    """The `aisopod-session` console script."""
    app()


if __name__ == "__main__":
    main()
