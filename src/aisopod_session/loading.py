"""The one way rows become model objects: `Loader`, and the loaders of sessions and
messages the repository and the export use.

Reading a row must cost little more than the driver's tuple, so `Loader` builds objects
the way SQLAlchemy's ORM and SQLModel do, without running either per row. It relies on
these internals, each guarded by a test:

- SQLModel's objects are pydantic models whose state is four slots, `__dict__`,
  `__pydantic_fields_set__`, `__pydantic_extra__` and `__pydantic_private__`, set here
  with `object.__setattr__` on an object from `object.__new__`
  (tests/test_connections.py: `test_built_objects_behave_like_orm_loaded_ones`, and every
  repository test reading what it wrote);
- SQLAlchemy's ORM reads an instance's state from its `_sa_instance_state` attribute and
  accepts an `sqlalchemy.orm.state.InstanceState(obj, mapper.class_manager)` whose `key`
  is the identity key (tests/test_connections.py:
  `test_built_objects_get_their_orm_state_when_first_asked`,
  which inspects, copies and `merge`s a built object into an ORM session);
- the standard library's `json.JSONDecoder.scan_once` (models.py, `_strict_json`, the
  reader of every JSON cell) returns a value read at an index with the index it ended
  at, and raises `StopIteration` where no value starts (tests/test_connections.py:
  `test_json_cells_are_read_exactly_as_json_loads_reads_them`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Generic, TypeVar

from sqlalchemy import inspect
from sqlalchemy.orm.state import InstanceState as _InstanceState
from sqlmodel import SQLModel

from aisopod_session.errors import DamagedRowError
from aisopod_session.models import Message, Session, StoredText

Model = TypeVar("Model", bound=SQLModel)

logger = logging.getLogger("aisopod_session")


class Loader(Generic[Model]):
    """A model's columns in mapper order, and the one way their values become objects."""

    def __init__(
        self, model: type[Model], *, skip: int = 0, fallbacks: Mapping[str, Any] | None = None
    ) -> None:
        """`skip`: how many leading columns of a row come before the model's (a history
        row starts with the session's id). `fallbacks`: values by column name for cells
        that cannot be read; with them a row is never refused but read with those values
        in place (and a warning logged naming table, row and column); without, a row that
        cannot be read raises `DamagedRowError`."""
        mapper = inspect(model)
        self.model = model
        self._fallbacks = dict(fallbacks or {})
        # Attribute names, not column names: `meta` maps the `metadata` column.
        self.names = tuple(prop.key for prop in mapper.column_attrs)
        self.columns = [prop.columns[0] for prop in mapper.column_attrs]
        if self.names[0] != "id":
            raise TypeError(f"{model.__name__}: the first column must be the id")
        self._manager = mapper.class_manager
        # Class attribute named as SQLAlchemy's state attribute; see _StateOnDemand.
        if not isinstance(model.__dict__.get("_sa_instance_state"), _StateOnDemand):
            type.__setattr__(model, "_sa_instance_state", _StateOnDemand(model, self._manager))
        self.skip = skip
        self.read: Callable[[Sequence[Any]], Model] = self._compile_reader(skip, stored=True)
        """An object from a row of stored values, in `columns` order after `skip`
        leading columns."""
        self.build: Callable[[Sequence[Any]], Model] = self._compile_reader(0, stored=False)
        """An object from Python values in `columns` order (the values of a row just
        written)."""

    def _compile_reader(self, skip: int, *, stored: bool) -> Callable[[Sequence[Any]], Model]:
        """Write, once, the function that turns a row into an object the way the ORM
        makes one when it loads a row (a bare instance; SQLModel's `__new__`: pydantic's
        three slots) with the values in place, each column read with its type's
        `StoredText.read` (skipping NULL where the column allows it), in one dictionary
        display. Its ORM state, marking it the detached copy of its row, is made on first
        use (`_StateOnDemand`). This is what `dataclasses` does for `__init__`: SQLModel's
        `__init__` would re-run validation and defaults, the ORM's loading machinery costs
        as much again, and even a loop over the columns with a call per column costs half
        again as much as this, for every row of every read. With `stored=False` the
        values are taken as they are."""
        env: dict[str, Any] = {
            "new": _new_object,
            "set_slot": _set_slot,
            "model": self.model,
            "names": self.names,
            "damaged": partial(self._damaged, skip),
            "lenient": partial(self._lenient, skip) if self._fallbacks and stored else None,
            "bad_int": _bad_int,
        }
        items = []
        for index, (name, column) in enumerate(zip(self.names, self.columns, strict=True)):
            value = f"row[{index + skip}]"
            if stored and isinstance(column.type, StoredText):
                env[f"read_{index}"] = column.type.read
                if column.nullable:
                    value = f"(None if (v{index} := {value}) is None else read_{index}(v{index}))"
                else:
                    value = f"read_{index}({value})"
            elif stored and name in _COUNTERS:
                # Counters are summed in SQL: one SQLite may have turned into a float.
                value = f"(v{index} if type(v{index} := {value}) is int else bad_int(v{index}))"
            items.append(f"{name!r}: {value}")
        items.append(f"{_BUILT!r}: True")
        source = (
            "def read_row(row):\n"
            "    obj = new(model)\n"
            "    try:\n"
            f"        values = {{{', '.join(items)}}}\n"
            "    except Exception:\n"
            "        if lenient is not None:\n"
            "            return lenient(row)\n"
            "        damaged(row)\n"
            "        raise\n"
            "    set_slot(obj, '__dict__', values)\n"
            "    set_slot(obj, '__pydantic_fields_set__', set(names))\n"
            "    set_slot(obj, '__pydantic_extra__', None)\n"
            "    set_slot(obj, '__pydantic_private__', None)\n"
            "    return obj\n"
        )
        exec(compile(source, f"<row reader of {self.model.__name__}>", "exec"), env)
        reader: Callable[[Sequence[Any]], Model] = env["read_row"]
        return reader

    def _lenient(self, skip: int, row: Sequence[Any]) -> Model:
        """The object of a row some cells of which cannot be read: those take their
        fallback value, each logged as a damaged cell."""
        table = str(self.model.__tablename__)
        row_id = row[skip]
        values = list(row[skip:])
        for index, column in enumerate(self.columns):
            value = values[index]
            if value is None and column.nullable:
                continue
            try:
                if isinstance(column.type, StoredText):
                    values[index] = column.type.read(value)
                elif column.name in _COUNTERS and type(value) is not int:
                    _bad_int(value)
            except Exception as exc:
                if column.name not in self._fallbacks:
                    raise DamagedRowError(table, row_id, column.name, _reason(value, exc)) from exc
                error = DamagedRowError(table, row_id, column.name, _reason(value, exc))
                logger.warning("read a damaged cell as %r: %s", self._fallbacks[column.name], error)
                values[index] = self._fallbacks[column.name]
        return self.build(values)

    def _damaged(self, skip: int, row: Sequence[Any]) -> None:
        """Raise `DamagedRowError` naming the first column of `row` that cannot be read
        (the fast reader failed; this finds where)."""
        table = str(self.model.__tablename__)
        row_id = row[skip]
        for index, column in enumerate(self.columns):
            value = row[index + skip]
            if value is None and column.nullable:
                continue
            try:
                if isinstance(column.type, StoredText):
                    column.type.read(value)
                elif column.name in _COUNTERS:
                    _bad_int(value) if type(value) is not int else None
            except Exception as exc:
                raise DamagedRowError(table, row_id, column.name, _reason(value, exc)) from exc


_COUNTERS = frozenset(
    {"message_count", "token_usage", "input_tokens", "output_tokens", "compaction_count"}
)


def _bad_int(value: Any) -> int:
    raise ValueError(f"not an integer but {type(value).__name__}")


def _reason(value: Any, error: Exception) -> str:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    message = str(error) or type(error).__name__
    return f"cannot read {shown}: {message}"


_BUILT = "_aisopod_built"
"""Marks, in an object's `__dict__`, that `Loader.build` made it and it has no ORM state
until one is asked for."""


class _StateOnDemand:
    """The ORM state of an object built by `Loader.build`, made when first asked for.

    SQLAlchemy reads an instance's state as its `_sa_instance_state` attribute; the ORM
    keeps it in the instance's `__dict__`, which attribute lookup reads before this class
    attribute, so objects the ORM made (and objects made by `Model(...)`) never reach
    here. A built object does, the first time anything inspects it, merges it into an
    ORM session or touches a relationship: it then gets the state the ORM would have
    given it (detached, identity key of its id), kept in its `__dict__`. A state costs
    about as much to make and to free as the rest of the object, and most objects
    returned by the repository are only read. Anything else has no state, as before.
    """

    def __init__(self, model: type[SQLModel], manager: Any) -> None:
        self._model = model
        self._manager = manager

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        attributes = obj.__dict__
        if _BUILT not in attributes:
            raise AttributeError("_sa_instance_state")
        state = _InstanceState(obj, self._manager)
        state.key = (self._model, (attributes["id"],), None)
        attributes["_sa_instance_state"] = state
        return state


_new_object = object.__new__
_set_slot = object.__setattr__


SESSION = Loader(Session)
MESSAGE = Loader(Message)
UNREADABLE_TIME = datetime(1970, 1, 1, tzinfo=UTC)
"""What a message's `created_at` reads as when another program stored text that is no
timestamp (logged as a damaged cell): history never fails because of one cell."""

HISTORY_MESSAGE = Loader(Message, skip=1, fallbacks={"created_at": UNREADABLE_TIME})
"""Messages from `history` rows, which start with the session's id."""
