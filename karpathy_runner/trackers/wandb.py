"""Weights & Biases: one W&B run per kdl run, its files under the run folder (wandb/)."""

from __future__ import annotations

import html
import netrc
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import KdlError
from .base import Held, Opening, scalars

WANDB_EXIT = {"completed": 0, "interrupted": 130}  # W&B marks a run that ends non-zero failed


def wandb_mode(mode: str) -> str | None:
    """train.wandb.mode, with auto resolved: $WANDB_MODE when set (None: W&B reads it), online
    when this user is logged in, else offline (the run syncs later with `wandb sync`)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if wandb_logged_in() else "offline"


def wandb_logged_in() -> bool:
    """Whether W&B has credentials where it looks for them: WANDB_API_KEY, an identity token
    file, or the entry `wandb login` writes into ~/.netrc (or $NETRC) for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Held):
    """One W&B run per kdl run, its files under the run folder (wandb/), reopened by id on a
    resume. A W&B run's history is written in steps that only go up, so it is handed records
    that a checkpoint covers, in order, like MLflow."""

    name = "wandb"

    def __init__(self, run: Any):
        super().__init__()
        self.run = run
        self._row: dict[str, Any] = {}
        self._row_step: int | None = None

    @classmethod
    def open(cls, opening: Opening) -> WandbTracker:
        import wandb

        cfg, previous = opening.setup.wandb, opening.previous("wandb")
        try:
            run = wandb.init(
                dir=str(opening.folder), id=previous.get("id") or secrets.token_hex(4),
                resume="allow", project=cfg.project or opening.setup.name, entity=cfg.entity,
                name=opening.run_id, config=opening.setup.params, mode=wandb_mode(cfg.mode),
                tags=[f"{key}={value}" for key, value in opening.tags.items() if key != "kdl.run_id"],
                reinit="create_new", allow_val_change=True,
            )
        except (wandb.Error, OSError) as exc:
            raise KdlError(
                f"could not open this run's W&B run ({str(exc).strip().rstrip('.')}). Log in with "
                "`wandb login`, set train.wandb.mode: offline, or leave wandb out of train.loggers; "
                f"then continue with `{opening.resume}`"
            ) from None
        tracker = cls(run)
        if opening.history and not previous:  # added at a resume: the history so far
            tracker._send_records(opening.history)
            tracker.flush()
        return tracker

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project, "mode": self.run.settings.mode}

    def _send_records(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._log(record.get("step", 0), scalars(record))

    def _send_image(self, tag: str, image: Any, step: int) -> None:
        import wandb

        self._log(step, {tag: wandb.Image(image)})

    def _send_text(self, tag: str, text: str, step: int) -> None:
        import wandb

        self._log(step, {tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def _log(self, step: int, values: dict[str, Any]) -> None:
        """Values of one step join one history row; the row goes once a later step comes."""
        if self._row_step is not None and step != self._row_step:
            self.flush()
        self._row_step = step
        self._row.update(values)

    def flush(self) -> None:
        if self._row_step is not None:
            self.run.log(self._row, step=self._row_step)
        self._row, self._row_step = {}, None

    def finish(self, status: str, files: list[Path]) -> None:
        # as <kdl run id>/config.yaml: W&B's own config.yaml and summary.json sit in the same files
        for path in files:
            self.run.save(str(path), base_path=str(path.parent.parent), policy="now")
        self.run.finish(exit_code=WANDB_EXIT.get(status, 1))


TRACKER = WandbTracker
