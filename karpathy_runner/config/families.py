"""Families: the config classes of datasets, models and tasks, and their open registries.

A family is a config class registered with one call, `register`, from inside the package or
outside it. The class is the whole of the family's interface to the rest of kdl: its `name`
values, its options (pydantic fields), its declarations (the class values below, with their
defaults) and `BUILD`, the "module:attribute" that builds it, imported only when something is
built, so that configs validate without torch:

- a data family's BUILD names `build(cfg, seed, vocabulary, preprocessing) -> data.DataBundle`,
- a model family's names `build(cfg, info) -> torch.nn.Module` (a `models.Model` for lr groups),
- a task family's names its `tasks.Task` subclass, made as `Task(cfg, model_cfg, info, device)`.

Nothing outside a family asks which family it is: the rest of kdl calls the hooks declared here and
on those base classes, and each family answers for itself.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any, ClassVar, Generic, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field

from ..errors import KdlError, quoted

# seeds go to generators that take 64 bits (torch.manual_seed): bounded here, not by a traceback
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class Branch(BaseModel):
    """A config branch: unknown keys are refused, values are never silently coerced from text."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class Family(Branch):
    """The config class of one family: `name` is a Literal of the names it answers to."""

    BUILD: ClassVar[str] = ""  # "module:attribute" of what builds the family (see the module doc)
    NOUN: ClassVar[str] = ""  # what the branch's families are called in messages: "dataset", ...

    name: str

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The `name` values this family answers to."""
        return get_args(cls.model_fields["name"].annotation)


class DataConfig(Family):
    """A data family. Each one has (as fields) batch_size and eval_batch_size."""

    NOUN: ClassVar[str] = "dataset"
    KIND: ClassVar[str] = ""  # what the data holds: image, image_rows, text, chars
    # data kind -> what to change for models that other kinds of data suit (messages)
    KIND_NOTES: ClassVar[dict[str, str]] = {}
    EVAL_BATCH_MIN: ClassVar[int] = 256  # eval batches at least this big (bigger evaluate faster)

    @classmethod
    def kind_of(cls, values: dict[str, Any]) -> str:
        """The kind of data a branch with these (raw) values gives."""
        return cls.KIND

    def kind(self) -> str:
        return type(self).kind_of(self.model_dump())

    def loader_workers(self) -> int:
        """DataLoader worker processes for data that streams from the host."""
        return 0

    def missing_split(self, split: str) -> str:
        """Why the data has no `split` (val or test), and how to get one."""
        if split == "val":
            return "data.val_fraction is 0; train a run with data.val_fraction > 0 to have one"
        return f"this dataset has no {split} split"

    def memory_problem(self, info: Any, memory: int) -> str | None:
        """Why a batch of this data cannot fit in `memory` bytes (info: the data's DataInfo)."""
        return None


class ModelConfig(Family):
    """A model family."""

    NOUN: ClassVar[str] = "model"
    # task name -> the data kinds on which that task trains this model: for tasks that do not
    # name the model in their own TRAINS (a new model for an existing task)
    TASKS: ClassVar[dict[str, tuple[str, ...]]] = {}

    def problems(self, data: DataConfig) -> list[str]:
        """What keeps this model from this data (empty when nothing does)."""
        return []

    def preprocessing(self) -> Any:
        """The input preparation (a data.Preprocessing) that pretrained weights expect, which
        the data then applies instead of its own; None: the data's own."""
        return None

    def shapes_only(self) -> ModelConfig:
        """The same model built without reading any weights (to count its parameters)."""
        return self


class TaskConfig(Family):
    """A task family: the models it trains, its metrics, what it trains on what data."""

    NOUN: ClassVar[str] = "task"
    MODELS: ClassVar[tuple[str, ...]] = ("model",)  # its models with an optimizer each
    METRICS: ClassVar[dict[str, str]] = {"loss": "min"}  # metric -> "min" | "max": which is better
    DEFAULT_METRIC: ClassVar[str | None] = "val.loss"  # train.best_metric unless set; None: none
    TRAINS: ClassVar[dict[str, tuple[str, ...]]] = {}  # data kind -> the model families it trains

    def problems(self, model: ModelConfig, data: DataConfig) -> list[str]:
        """What keeps this task from this model and data (empty when nothing does)."""
        return []


F = TypeVar("F", bound=Family)


class Registry(Generic[F]):
    """The families of one config branch (data, model, task), in the order they registered: the
    first is the branch's default."""

    def __init__(self, branch: str, base: type[F]):
        self.branch, self.base = branch, base
        self._classes: dict[str, type[F]] = {}

    def add(self, cls: type[F]) -> type[F]:
        names = cls.names()
        if not names or not cls.BUILD:
            raise TypeError(f"{cls.__name__} needs a `name: Literal[...]` field and BUILD")
        taken = [name for name in names if self._classes.get(name, cls) is not cls]
        if taken:
            raise ValueError(f"{self.branch} family names {taken} are taken by "
                             f"{self._classes[taken[0]].__name__}")
        self._classes.update(dict.fromkeys(names, cls))
        return cls

    def remove(self, cls: type[F]) -> None:
        for name in cls.names():
            self._classes.pop(name, None)

    def get(self, name: Any) -> type[F] | None:
        return self._classes.get(name) if isinstance(name, str) else None

    def classes(self) -> list[type[F]]:
        return list(dict.fromkeys(self._classes.values()))

    def names(self) -> list[str]:
        return sorted(self._classes)

    def default_name(self) -> str:
        return self.classes()[0].names()[0]

    def unknown(self, given: Any) -> str:
        """The message for a name no family answers to."""
        return (f"{self.branch}.name: unknown {self.base.NOUN} {quoted(given)}. "
                f"Valid names: {', '.join(self.names())}")


DATA: Registry[DataConfig] = Registry("data", DataConfig)
MODELS: Registry[ModelConfig] = Registry("model", ModelConfig)
TASKS: Registry[TaskConfig] = Registry("task", TaskConfig)
REGISTRIES: dict[str, Registry[Any]] = {"data": DATA, "model": MODELS, "task": TASKS}


def registry_of(cls: type[Family]) -> Registry[Any]:
    for registry in REGISTRIES.values():
        if issubclass(cls, registry.base):
            return registry
    raise TypeError(f"{cls.__name__} is not a DataConfig, ModelConfig or TaskConfig")


def register(cls: type[F]) -> type[F]:
    """Add a family (its config class) to its branch's registry; usable as a class decorator."""
    return registry_of(cls).add(cls)


def unregister(cls: type[Family]) -> None:
    """Take a family out of its registry again (a test's family, after the test)."""
    registry_of(cls).remove(cls)


PLUGINS = "kdl.families"  # the entry-point group through which other packages add families


def load_plugins() -> None:
    """The families other installed packages declare: each entry point of the group
    `kdl.families` names a module whose import registers them, so that they exist in every
    kdl process (a sweep's points and torchrun's workers too). A plugin that fails to load is a
    clear error naming it."""
    from importlib.metadata import entry_points

    for point in entry_points(group=PLUGINS):
        try:
            point.load()
        except Exception as exc:  # any error of another package's code: say whose it is
            raise KdlError(
                f"the kdl family plugin {point.name!r} ({point.value}, an entry point of group "
                f"{PLUGINS!r}) could not be loaded: {type(exc).__name__}: {exc}. Fix or uninstall "
                "the package that declares it."
            ) from None


def builder(cfg: Family) -> Any:
    """What builds a family: the attribute its class's BUILD names, imported now."""
    module, _, attribute = type(cfg).BUILD.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ----------------------------------------------------------------------------- which task trains what

KIND_WORDS = {"image_rows": "image rows", "chars": "character"}  # data kinds in messages


def data_kind(data: Any) -> str | None:
    """What a `data` branch (raw or validated) holds: image, image_rows, text, chars."""
    if isinstance(data, DataConfig):
        return data.kind()
    values = data if isinstance(data, dict) else {} if data is None else None
    if values is None:
        return None
    cls = DATA.get(values.get("name", DATA.default_name()))
    return None if cls is None else cls.kind_of(values)


def trains(task: type[TaskConfig], model: Any, kind: str | None) -> bool:
    """Whether `task` trains model family `model` on data of `kind`: as the task declares it, or
    as the model declares it of the task."""
    if model in task.TRAINS.get(kind, ()):
        return True
    model_cls = MODELS.get(model)
    return model_cls is not None and any(kind in model_cls.TASKS.get(name, ()) for name in task.names())


def default_task(model: Any, kind: str | None, tasks: list[Any] | None = None) -> Any:
    """The first task that trains `model` on data of `kind`, or None."""
    return next((cls for cls in (TASKS.classes() if tasks is None else tasks)
                 if trains(cls, model, kind)), None)


def task_problems(task: Any, model: str, data: str, kind: str, tasks: list[Any] | None = None,
                  note: str = "") -> list[str]:
    """Why a task cannot train this model on this data (empty when it can); `note` is the data
    family's hint for this kind (another setting that would suit other models)."""
    if trains(task, model, kind):
        return []
    tasks = TASKS.classes() if tasks is None else tasks
    task_name, what = task.names()[0], KIND_WORDS.get(kind, kind)
    suitable = default_task(model, kind, tasks)
    if suitable is not None:
        return [f"task.name: the {task_name} task cannot train model.name {model!r} on "
                f"data.name {data!r} ({what} data); for that pair use task.name: "
                f"{suitable.names()[0]} (the default when task is not set)"]
    models = [m for cls in tasks for m in cls.TRAINS.get(kind, ())]
    models += [m.names()[0] for m in MODELS.classes() for cls in tasks if trains(cls, m.names()[0], kind)]
    fix = (f"on {what} data use model.name: {' or '.join(dict.fromkeys(models))}" if models
           else "choose another dataset")
    fix += f", {note}" if note else ""
    return [f"model.name: no task trains model.name {model!r} on data.name {data!r} ({what} "
            f"data); {fix}"]
