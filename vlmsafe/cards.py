"""Model cards and the Hugging Face Hub for vlmsafe's artefacts: steering vectors, ShiftDC directions,
Safe-CLIP encoders and merged models travel like Hub models.

Every artefact folder holds a ``README.md`` in the Hub's model-card format: YAML metadata
(``base_model``, ``library_name``, ``license``, ``tags`` and a ``vlmsafe`` block with the artefact kind, the
method, its settings and a sha256 + description of the calibration or training data) above a body a person
reads. The card is written by the artefact's own writer inside its atomic output (the same temporary folder
as the weights), so a folder never exists without its card or with a stale one.

Loading takes a local folder or a Hub repository id (:func:`resolve`): an id is fetched with
``huggingface_hub.snapshot_download``, limited to the artefact's files, and the downloaded folder is checked
exactly like a local one. Offline (``HF_HUB_OFFLINE=1``) an id that is not in the cache is one clear error
naming the id and the fix. :func:`push_to_hub` uploads a saved folder (``create_repo`` + ``upload_folder``).

``library_name`` follows what the Hub uses it for (the "use this model" snippet): ``vlmsafe`` for steering
vectors and directions, which only vlmsafe reads; ``transformers`` (or ``open_clip``) for Safe-CLIP encoders
and merged models, which load with those libraries as they are. The ``vlmsafe`` tag marks them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError, InputError

CARD_FILE = "README.md"
LIBRARY_NAME = "vlmsafe"
#: Artefacts are derived from their base model's weights, whose terms apply; ``other`` until the user sets one.
DEFAULT_LICENSE = "other"
#: Files of a transformers / open_clip checkpoint (config, weights, tokenizer, processor, chat template).
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", CARD_FILE)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- writing
def hub_id(name: Any) -> str | None:
    """``name`` when it names a Hub repository (``org/name``, not a local path), else ``None``.

    Only such ids go into a card's ``base_model`` (the Hub links them and refuses anything else), as
    mergekit does; local paths stay in the ``vlmsafe`` block."""
    if not isinstance(name, str):
        return None
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)
    return name if _HUB_ID.match(name) and not looks_local else None


def display_name(name: Any) -> str | None:
    """How a card's title names a model: its Hub id, or a local folder's name (not the path on this machine)."""
    if not name:
        return None
    return hub_id(name) or Path(os.fspath(name)).name or str(name)


def digest_lines(lines: Iterable[str]) -> str:
    """sha256 of ``lines`` joined by newlines: a data fingerprint that does not depend on where the files lie."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class ArtifactCard:
    """What a model card says about an artefact: the fields of :func:`render_card`, kept together.

    ``base_model``: the model(s) the artefact came from, as recorded (paths or ids); the Hub ids among them
    become ``base_model`` (with ``base_model_relation`` = ``relation``), all of them stay in
    ``vlmsafe.base_model``. ``settings`` / ``data`` go to ``vlmsafe.settings`` / ``vlmsafe.data`` and, as a
    table, into the body; ``sections`` are ``(heading, markdown)`` pairs added after them. ``library_name`` is
    the library that loads the artefact (the Hub's "use this model" snippet); ``license`` defaults to
    :data:`DEFAULT_LICENSE` (the base model's terms).
    """

    artifact: str
    method: str
    title: str
    summary: str
    base_model: str | Sequence[str] | None
    settings: Mapping[str, Any]
    data: Mapping[str, Any] | None
    sections: Sequence[tuple[str, str]] = ()
    library_name: str = LIBRARY_NAME
    relation: str | None = None
    tags: Sequence[str] = ()
    license: str | None = None
    pipeline_tag: str | None = None

    def render(self) -> str:
        """The text of the card (YAML metadata + Markdown body), made with ``huggingface_hub.ModelCard``."""
        from huggingface_hub import ModelCard, ModelCardData

        from vlmsafe import __version__

        base_model, settings, data, license = self.base_model, self.settings, self.data, self.license
        bases = [base_model] if isinstance(base_model, str) else [b for b in (base_model or []) if b]
        hub_bases = [b for b in bases if hub_id(b)]
        block: dict[str, Any] = {"artifact": self.artifact, "method": self.method, "version": __version__,
                                 "base_model": bases[0] if len(bases) == 1 else bases or None,
                                 "settings": _plain(dict(settings))}
        if data is not None:
            block["data"] = _plain(dict(data))
        meta = ModelCardData(
            base_model=(hub_bases[0] if len(hub_bases) == 1 else hub_bases) or None,
            library_name=self.library_name,
            license=license or DEFAULT_LICENSE,
            tags=list(dict.fromkeys([LIBRARY_NAME, *self.tags])),
            pipeline_tag=self.pipeline_tag,
            **({"base_model_relation": self.relation} if hub_bases and self.relation else {}),
            vlmsafe=block,
        )
        body = [f"# {self.title}", "", self.summary.strip(), "", "## Settings", "", _table(settings, "setting")]
        if data is not None:
            body += ["", "## Data", "", _table(data, "field")]
        for heading, text in self.sections:
            body += ["", f"## {heading}", "", text.strip()]
        body += ["", "## Provenance", "",
                 f"Written by vlmsafe {__version__}. Base model: "
                 + (", ".join(f"`{b}`" for b in bases) or "not recorded") + ". License: "
                 + (f"`{license}`." if license else "the base model's terms apply (`other` until one is set).")]
        card = ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
        return str(card.content)


def render_card(**fields: Any) -> str:
    """The text of a model card: ``ArtifactCard(**fields).render()`` (see :class:`ArtifactCard` for the fields)."""
    return ArtifactCard(**fields).render()


def write_card(folder: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (from :func:`render_card`) as ``folder/README.md``: call it inside the artefact's atomic
    output so the card and the weights appear together."""
    path = Path(folder) / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path


def read_card(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML metadata of ``folder``'s card (``{}`` without one); a malformed card is a :class:`FileFormatError`."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception as exc:  # yaml.YAMLError, ValueError: whatever the card's parser raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{path}: not a readable model card ({first}); re-save the artefact with "
                              "vlmsafe") from None


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and non-JSON scalars as strings (YAML metadata must round-trip)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _table(values: Mapping[str, Any], header: str) -> str:
    rows = [f"| {header} | value |", "|---|---|"]
    for key, value in values.items():
        shown = json.dumps(_plain(value)) if isinstance(value, (Mapping, list, tuple)) else str(value)
        rows.append(f"| {key} | {shown.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- reading: a folder or a Hub id
def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def remote_id(spec: str | os.PathLike[str]) -> str | None:
    """``spec`` when it is to be fetched from the Hub: an ``org/name`` id that is no local path (it does not
    exist, is not absolute or ``./`` / ``~``, and ``org`` is no local folder: a typo in a path is never sent
    to the Hub), else ``None``."""
    text = os.fspath(spec)
    expanded = os.path.expanduser(text)
    parent = os.path.dirname(expanded.rstrip("/\\"))
    if hub_id(text) is None or (parent and os.path.isdir(parent)):
        return None
    return text


def resolve(spec: str | os.PathLike[str], *, patterns: Sequence[str], what: str, revision: str | None = None) -> Path:
    """The local folder of ``spec``: itself when it exists or looks like a path, else a Hub repository id
    downloaded with ``huggingface_hub.snapshot_download`` (only ``patterns``; the cache is reused).

    A path that does not exist is returned as it is, for the artefact's own loader to report as it always
    has. Hub failures become one :class:`FileFormatError` line naming the id and the fix: offline and not in
    the cache, no such repository (or private), no such revision, the Hub unreachable.
    """
    text = remote_id(spec)
    if text is None:
        return Path(os.path.expanduser(os.fspath(spec)))
    import huggingface_hub
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from vlmsafe import __version__

    try:
        folder = huggingface_hub.snapshot_download(text, revision=revision, allow_patterns=list(patterns),
                                                   library_name=LIBRARY_NAME, library_version=__version__)
    except RepositoryNotFoundError:
        raise FileFormatError(f"{text}: no such local folder, and no such repository on the Hugging Face Hub (or it "
                              f"is private: log in with `hf auth login`); pass {what} or a Hub id") from None
    except RevisionNotFoundError:
        raise FileFormatError(f"{text}: the Hugging Face Hub repository has no revision {revision!r}; pass an "
                              "existing branch, tag or commit") from None
    except LocalEntryNotFoundError:
        if _offline():
            raise FileFormatError(
                f"{text}: no such local folder, and not in the Hugging Face cache while offline (HF_HUB_OFFLINE=1); "
                f"download it once online (`hf download {text}` with HF_HUB_OFFLINE unset) or pass {what}"
            ) from None
        raise FileFormatError(f"{text}: could not be downloaded from the Hugging Face Hub (no connection?) and is "
                              f"not in the cache; check the network, or pass {what}") from None
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{text}: the Hugging Face Hub refused the download ({first}); pass {what}") from None
    return Path(folder)


# --------------------------------------------------------------------------- pushing
def check_push_target(repo_id: Any) -> str:
    """``repo_id`` when an upload to it can be tried: a ``user-or-org/name`` id, and offline mode off. The CLI's
    ``--push-to-hub`` calls it before the work, so a run that cannot upload stops before it computes anything."""
    if not isinstance(repo_id, str) or not _HUB_ID.match(repo_id):
        raise InputError(f"repo_id {repo_id!r} is not a Hub repository id; write it as 'user-or-org/name'")
    if _offline():
        raise InputError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to upload")
    return repo_id


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    patterns: Sequence[str] | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload the saved artefact ``folder`` (with its card) to the Hub repository ``repo_id``; returns the
    commit's URL. ``patterns`` limits the upload to the artefact's files (default: every file).

    The folder must hold a vlmsafe card: what is uploaded is an artefact a vlmsafe writer completed, not any
    folder. Offline mode is refused at once rather than after the upload's retries.
    """
    import huggingface_hub

    root = Path(folder)
    if not root.is_dir():
        raise FileFormatError(f"{root}: no such folder; save the artefact first, then push that folder")
    meta = read_card(root)
    if not isinstance(meta.get(LIBRARY_NAME), Mapping):
        raise FileFormatError(f"{root}: no vlmsafe model card ({CARD_FILE} with a `vlmsafe:` block); push a folder "
                              "saved by vlmsafe (ShiftVectors.save, SafetyDirections.save, save_pretrained, merge)")
    check_push_target(repo_id)
    api = huggingface_hub.HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo = getattr(url, "repo_id", None) or repo_id
    info = api.upload_folder(
        repo_id=repo, folder_path=str(root), revision=revision, create_pr=create_pr,
        commit_message=commit_message or f"Upload {meta[LIBRARY_NAME].get('artifact', 'artefact')} with vlmsafe",
        allow_patterns=list(patterns) if patterns is not None else None,
    )
    return str(getattr(info, "commit_url", None) or info)


def push_saved(save: Any, repo_id: str, **kwargs: Any) -> str:
    """Save an in-memory artefact into a temporary folder with ``save(folder)`` and push it (what the
    ``push_to_hub`` methods do, like transformers' ``model.push_to_hub``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vlmsafe-push-") as tmp:
        folder = Path(tmp) / "artefact"
        save(folder)
        return push_to_hub(folder, repo_id, **kwargs)


__all__ = [
    "CARD_FILE",
    "CHECKPOINT_PATTERNS",
    "LIBRARY_NAME",
    "ArtifactCard",
    "check_push_target",
    "digest_lines",
    "display_name",
    "hub_id",
    "push_saved",
    "push_to_hub",
    "read_card",
    "remote_id",
    "render_card",
    "resolve",
    "write_card",
]
