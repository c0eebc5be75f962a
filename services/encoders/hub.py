"""Published weights from the Hugging Face hub: a pinned commit and safetensors only, never a moving branch
or a pickle (a repository's owner can change `main`, and a pickled checkpoint runs code when loaded)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from services.encoders.errors import EncoderError

COMMIT_PATTERN = r"^[0-9a-f]{40}$"
HUB_LOOKUP_TIMEOUT_SECONDS = 20.0

logger = logging.getLogger(__name__)


def revision_field(default_note: str) -> Any:
    """The `revision` option of every encoder that loads from the hub."""
    return Field(
        None,
        pattern=COMMIT_PATTERN,
        description=f"the 40-character commit of the hub repository to load; None = {default_note}",
    )


@dataclass(frozen=True)
class HubModel:
    """A registered hub repository and the commit this project loads from it."""

    hub_id: str
    # None where no commit of it has been verified for this project: a load then pins the commit that the
    # repository's default branch points at when the job starts, and the manifest records it.
    revision: str | None

    def pin(self, hub_id: str | None, revision: str | None) -> tuple[str, str | None]:
        """Where a load reads from and at which commit: the registered pair unless the options name others."""
        if hub_id is None or hub_id == self.hub_id:
            return self.hub_id, revision or self.revision or current_commit(self.hub_id)
        return hub_id, revision


def current_commit(hub_id: str) -> str:
    """The commit `hub_id`'s default branch points at now: one fixed commit for every load of this job."""
    from huggingface_hub import HfApi

    try:
        commit = HfApi().model_info(hub_id, timeout=HUB_LOOKUP_TIMEOUT_SECONDS).sha
    except Exception as exc:
        raise EncoderError(
            f"{hub_id!r} has no commit registered in this project and its current commit cannot be looked up "
            f"on the Hugging Face hub ({type(exc).__name__}: {exc}): set the option revision=<the 40-character "
            "commit you reviewed> (e.g. `--set codec.options.revision=...`), or hub_id=<a local directory "
            "holding a downloaded copy>"
        ) from exc
    logger.warning("%s: no commit registered in this project; pinned to the hub's current commit %s "
                   "(recorded in the manifest; set revision= to choose another)", hub_id, commit)
    return commit


def from_pretrained_kwargs(
    what: str, source: str, revision: str | None, *, weights: bool = True
) -> dict[str, Any]:
    """`from_pretrained` arguments for `source` (a hub id or a local directory).

    A hub id needs a pinned commit; a local directory is read as it is. `weights=False` for tokenizers,
    which take no `use_safetensors`.
    """
    if Path(source).is_dir():
        if revision is not None:
            raise EncoderError(
                f"{what}: revision={revision!r} applies to hub ids, but {source!r} is a local directory: "
                "drop the revision option"
            )
        pinned: dict[str, Any] = {}
    elif revision is None:
        raise EncoderError(
            f"{what}: {source!r} would be loaded from the Hugging Face hub without a pinned commit: set the "
            "option revision=<the 40-character commit hash you reviewed> (e.g. `--set codec.options.revision=...` "
            "or `--set text.options.revision=...`), or hub_id=<a local directory holding a downloaded copy>"
        )
    else:
        pinned = {"revision": revision}
    return {**pinned, "use_safetensors": True} if weights else pinned
