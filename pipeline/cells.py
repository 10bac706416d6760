"""The recurrent cells: each one declared once, here, and read by everything else.

A cell is a name (``model.cell``), a display name (tables and plots), the Keras class that computes it, how many
blocks of ``units`` its recurrent kernel has (its gates: what the profile and the bench count as its arithmetic)
and, when there is one, its fused CPU kernel (``pipeline.kernels``). Classes are named by import path, so this
module imports no TensorFlow: the config checks read it at no cost.

The Keras class may be a layer (``keras.layers.LSTM``) or a cell (``keras.layers.SimpleRNNCell``, or your own
``keras.layers.Layer`` with ``state_size`` and ``call(inputs, states)``), which ``keras.layers.RNN`` then runs.
Bidirectional reading and stacking are wrappers around any cell (``models.recurrent_layer``). A cell without a fused
kernel runs Keras' loop inside the fused language-model path, and its run's ``kernels`` tag says so.

Keras' three are registered below; the variants (peephole LSTM, CIFG, NFG, NOAF, MGU, IndRNN) are one module each in
``pipeline/variants/``, found by name and loaded on first use.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CellError(ValueError):
    """A cell that is not registered, or whose class cannot be loaded."""


@dataclass(frozen=True)
class Cell:
    """One recurrent cell. ``keras``/``fused``: a class or its import path (``package.module.Class``)."""

    name: str  # model.cell, and the prefix of its layers' names
    display: str  # in tables and plots
    keras: str | type  # a Keras recurrent layer, or a cell that keras.layers.RNN runs
    gates: int  # blocks of `units` in its recurrent kernel: 1 SimpleRNN, 3 GRU, 4 LSTM
    fused: str | type | None = None  # its fused CPU kernel (a subclass of the Keras layer), if any

    def keras_class(self) -> type:
        return load(self.keras, f"cell {self.name!r}")

    def fused_class(self) -> type | None:
        return None if self.fused is None else load(self.fused, f"cell {self.name!r}'s fused kernel")


_REGISTRY: dict[str, Cell] = {}


def load(target: str | type, what: str) -> type:
    """The class ``target`` names (``package.module.Class``), or ``target`` itself when it is one."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as err:  # the user's module: a missing name, a syntax error, any failure of its own code
        raise CellError(f"{what}: cannot load {target!r} ({err}); give an importable package.module.Class") from err


def register(cell: Cell) -> Cell:
    """Add ``cell`` (its name must be new, and usable as a layer name)."""
    if not cell.name.isidentifier() or cell.name.startswith("bi"):
        raise CellError(f"cell name {cell.name!r}: letters, digits and '_', not starting with 'bi' (Bidirectional's)")
    if cell.name in _REGISTRY:
        raise CellError(f"cell {cell.name!r} is already registered")
    if cell.gates < 1:
        raise CellError(f"cell {cell.name!r}: gates must be at least 1, got {cell.gates}")
    _REGISTRY[cell.name] = cell
    return cell


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


@contextmanager
def registered(cell: Cell) -> Iterator[Cell]:
    """``cell`` registered for the ``with`` block only (a test's, or a script's own cell)."""
    register(cell)
    try:
        yield cell
    finally:
        unregister(cell.name)


VARIANTS = "pipeline.variants"  # one module per built-in cell beyond Keras' own, each with its CELL


def variants() -> tuple[str, ...]:
    """The built-in variant cells, by module name, found without importing them (nor TensorFlow)."""
    spec = importlib.util.find_spec(VARIANTS)
    found = pkgutil.iter_modules(spec.submodule_search_locations if spec else [])
    return tuple(sorted(m.name for m in found if not m.name.startswith("_")))


def _variant(name: str) -> Cell:
    """Register the variant module ``name``'s ``CELL`` on first use."""
    cell = importlib.import_module(f"{VARIANTS}.{name}").CELL
    if cell.name != name:
        raise CellError(f"{VARIANTS}.{name} declares cell {cell.name!r}: a variant's CELL is named as its module")
    return _REGISTRY.get(name) or register(cell)


def is_path(name: Any) -> bool:
    """``package.module:Class``: a cell from the user's own code rather than a registered name."""
    return isinstance(name, str) and ":" in name


def _imported(path: str) -> Cell:
    """The cell ``package.module:Attr`` names: a Keras RNN cell class (``state_size`` and ``call(inputs, states)``,
    which ``keras.layers.RNN`` runs), a Keras recurrent layer class, a factory ``f(units, **settings)`` of either, or
    a ``Cell``. Registered under the path on first use."""
    module, _, attr = path.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except Exception as err:  # the user's module: a missing name, a syntax error, any failure of its own code
        hint = "; put its folder on PYTHONPATH" if isinstance(err, ModuleNotFoundError) else ""
        raise CellError(f"model.cell={path!r}: cannot import it ({type(err).__name__}: {err}){hint}") from err
    if isinstance(found, Cell):
        cell = Cell(path, found.display, found.keras, found.gates, found.fused)
    else:
        _check_recurrent(found, path)
        _serializable(found, module)
        cell = Cell(path, getattr(found, "__name__", attr), found, gates=1)
    _REGISTRY[path] = cell
    return cell


def _serializable(found: Any, module: str) -> None:
    """Register the user's class with Keras' serializer unless they did, so that checkpoints and logged models of it
    load back (``tracking.load_model`` looks the cell up again from the run before loading)."""
    import keras

    if isinstance(found, type) and keras.saving.get_registered_object(keras.saving.get_registered_name(found)) is None:
        keras.saving.register_keras_serializable(package=module)(found)


def _check_recurrent(found: Any, path: str) -> None:
    """``found(units)`` must make a Keras RNN cell (a layer with ``state_size``) or a recurrent layer."""
    import keras  # only for a cell from the user's code: the registry itself imports no TensorFlow

    what = (
        f"model.cell={path!r} names {found!r}: give a Keras RNN cell class (a keras.layers.Layer with state_size and "
        "call(inputs, states)), a recurrent layer class or a factory of one"
    )
    if not callable(found):
        raise CellError(what)
    try:
        made = found(2)
    except Exception as err:  # the user's code: any failure is theirs to see
        raise CellError(f"{what}; {getattr(found, '__name__', path)}(2) failed: {err}") from err
    if not (
        isinstance(made, keras.layers.RNN) or (isinstance(made, keras.layers.Layer) and hasattr(made, "state_size"))
    ):
        raise CellError(what)


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*(n for n in _REGISTRY if not is_path(n)), *variants()]))


def get(name: str) -> Cell:
    """The cell called ``name`` (or named by an import path); an unknown one is an error listing the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in variants():
        return _variant(name)
    if is_path(name):
        return _imported(name)
    raise CellError(
        f"unknown cell type {name!r}; valid cell types: {', '.join(names())}, or package.module:Class for your own"
    )


def prefix(name: str) -> str:
    """A layer-name prefix for the cell: its name, or for an import path its attribute in lower case."""
    return name.partition(":")[2].lower() if is_path(name) else name


def display(name: Any, bidirectional: bool | None = None) -> str:
    """``lstm`` -> ``LSTM``, ``bilstm`` -> ``BiLSTM`` (a run's ``cell`` tag); anything else as it is.
    ``bidirectional``: the run's ``model.bidirectional`` where known, which tells ``bio_cells:Cell`` (a module
    named bio_cells) from ``o_cells:Cell`` both ways when the module does not import here."""
    text = str(name or "") or "?"
    if is_path(text):
        if bidirectional is None:
            bidirectional, path = own_path(text)
        else:
            path = text.removeprefix("bi") if bidirectional else text
        return ("Bi" if bidirectional else "") + _path_display(path)
    known = names()
    if text in known:
        return get(text).display
    if text.startswith("bi") and text[2:] in known:
        return "Bi" + get(text[2:]).display
    return text


def cell_settings(cls: type, settings: dict[str, Any], name: str) -> dict[str, Any]:
    """The model settings a cell class takes (its ``__init__`` names them). One it does not take may only be left
    at its default (0 recurrent dropout, Keras' initialisers): asked for, it is an error that says which (checked
    with the config, ``check_settings``, and again when the layer is made)."""
    import keras

    accepted = dict(inspect.signature(cls.__init__ if isinstance(cls, type) else cls).parameters)
    if not isinstance(cls, type) and any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        return settings  # a factory f(units, **settings) passes them on to the Keras class it makes
    if isinstance(cls, type) and issubclass(cls, keras.layers.Layer):
        accepted["dtype"] = None  # every Keras layer takes its dtype policy
    unsupported = [key for key, value in settings.items() if key not in accepted and value]
    if unsupported:
        keys = ", ".join(dict.fromkeys("model.init_scale" if "initializer" in k else f"model.{k}" for k in unsupported))
        raise CellError(f"cell {name!r} ({cls.__name__}) takes no {', '.join(unsupported)}: leave {keys} unset")
    return {key: value for key, value in settings.items() if key in accepted}


def check_settings(name: str, recurrent_dropout: float | None, init_scale: float | None) -> None:
    """A config's model settings against the cell ``name`` (an error that says which to leave unset)."""
    cls = get(name).keras_class()
    import keras

    if isinstance(cls, type) and issubclass(cls, keras.layers.RNN):
        return  # a whole Keras layer takes them all
    initialisers = ("kernel_initializer", "recurrent_initializer", "bias_initializer") if init_scale else ()
    cell_settings(cls, {"recurrent_dropout": recurrent_dropout, **dict.fromkeys(initialisers, True)}, name)


def code_digest(name: str) -> str | None:
    """sha256 of the file of the module an own cell's path names (None for a registered cell, or a module without a
    file): a run of edited cell code is another configuration, and never resumes a checkpoint of the old code."""
    if not is_path(name):
        return None
    get(name)  # imported, or a one-line error
    module = importlib.import_module(name.partition(":")[0])
    file = getattr(module, "__file__", None)
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16] if file else None


def own_path(tag: str) -> tuple[bool, str]:
    """A ``cell`` tag of an own cell as (bidirectional, import path): ``bimy_cell:Leaky`` is ``my_cell:Leaky`` both
    ways, unless ``bimy_cell`` is itself a module here (``bio_cells:Cell``)."""
    module = tag.partition(":")[0]
    if not tag.startswith("bi") or tag in _REGISTRY:
        return False, tag
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception:  # its package's own code failed: not findable here
        found = False
    return (False, tag) if found else (True, tag[2:])


def _path_display(path: str) -> str:
    """An own cell's display name; its attribute's name where its code does not import here (a report made without
    the sweep's ``PYTHONPATH`` only needs a name)."""
    try:
        return get(path).display
    except CellError:
        return path.partition(":")[2]


register(Cell("rnn", "SimpleRNN", "keras.layers.SimpleRNN", gates=1, fused="pipeline.kernels.FusedSimpleRNN"))
register(Cell("lstm", "LSTM", "keras.layers.LSTM", gates=4, fused="pipeline.kernels.FusedLSTM"))
register(Cell("gru", "GRU", "keras.layers.GRU", gates=3, fused="pipeline.kernels.FusedGRU"))
