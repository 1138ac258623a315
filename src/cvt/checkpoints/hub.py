"""What a model name means, and where its files are: `locate` reads a name one way for every
command and for Python (an existing folder or file, a variant name, a hub id), and `fetcher`
finds a checkpoint's files by name in a local folder or a hub repo (through huggingface_hub's
cache, which honours HF_HUB_OFFLINE; an unreachable hub is probed once, not retried).
Reading what the files hold is `cvt.checkpoints`' job.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, short
from ..variants import VARIANTS, Variant, get_variant

CONFIG_NAME = "config.json"
HUB_ARGUMENTS = {"revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder"}
HUB_TIMEOUT_S = 4  # one probe per process: an unreachable hub is reported, not retried for half a minute
WEIGHT_SUFFIXES = {".pth", ".pt", ".bin", ".safetensors"}

Fetch = Callable[[str], "Path | None"]  # a checkpoint file's name -> its local path, or None


class HubUnreachableError(CheckpointError):
    """A hub checkpoint that is not in the local cache while the hub cannot be reached."""


@dataclasses.dataclass(frozen=True)
class Location:
    """What a model name means. `kind` is "folder" (transformers layout), "file" (one weights
    file, original or transformers layout) or "hub" (a repo id); `variant` is the published
    variant it names, if any, whose architecture and preprocessing are known without the hub."""

    kind: str
    where: str
    variant: Variant | None = None


def locate(name_or_path: str | os.PathLike) -> Location:
    """The one reading of a model name, for every command and for Python: an existing folder or
    file first, then a variant name ("cvt-13" means its published weights, microsoft/cvt-13),
    then a hub id ("org/name")."""
    path, name = Path(name_or_path), str(name_or_path)
    if not name.strip():  # Path("") is the current folder: an unset $MODEL must not mean it
        raise CheckpointError(f"the model name is empty ({name!r}); give a variant name, a hub id, "
                              f"or a checkpoint folder or file")
    shown = short(name)
    try:
        kind = "folder" if path.is_dir() else "file" if path.is_file() else None
    except OSError:  # a name too long to be a path (ENAMETOOLONG) names no folder or file
        kind = None
    if kind is not None:
        return Location(kind, name)
    if path.suffix in WEIGHT_SUFFIXES | {".json"}:
        raise CheckpointError(f"{shown}: no such file")
    if name in VARIANTS:
        return Location("hub", get_variant(name).hub_id, get_variant(name))
    if _looks_like_hub_id(name):
        published = name.startswith("microsoft/") and name.removeprefix("microsoft/") in VARIANTS
        return Location("hub", name, get_variant(name) if published else None)
    raise CheckpointError(f"{shown}: no such folder or file, not a variant ({', '.join(VARIANTS)}) "
                          f"and not a hub id (org/name)")


def _looks_like_hub_id(name: str) -> bool:
    """org/name: a single word is taken for a (misspelt) variant name, never sent to the hub."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now (HF_HUB_OFFLINE, or its endpoint did not answer within
    HUB_TIMEOUT_S), or None; probed once per process and endpoint."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str) -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as err:
        return f"{endpoint} did not answer within {HUB_TIMEOUT_S} s ({getattr(err, 'reason', err)})"
    return None


def fetcher(location: Location, hub_kwargs: dict[str, Any] | None = None) -> Fetch:
    """`fetch(filename) -> local Path or None` for a folder or a hub repo."""
    if location.kind == "folder":
        folder = Path(location.where) / (hub_kwargs or {}).get("subfolder", "")
        return lambda name: (folder / name) if (folder / name).is_file() else None
    if location.kind == "hub":
        return _hub_fetcher(location.where, hub_kwargs or {})
    raise CheckpointError(f"{location.where} is a single weights file, not a folder or hub repo")


def _hub_fetcher(repo_id: str, hub_kwargs: dict[str, Any]) -> Fetch:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    unreachable = None if hub_kwargs.get("local_files_only") else hub_unreachable()
    if unreachable:
        hub_kwargs = {**hub_kwargs, "local_files_only": True}

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, **hub_kwargs))
        except LocalEntryNotFoundError as err:  # (a subclass of EntryNotFoundError: first)
            if name != CONFIG_NAME and fetch(CONFIG_NAME):
                return None  # the repo is cached (its config.json is): this file is not in it
            reason = unreachable or "local_files_only" if hub_kwargs.get("local_files_only") else err
            raise HubUnreachableError(f"the hub cannot be reached ({reason}) and {repo_id!r} is not in "
                                      f"the local cache; download it while online, or give a folder"
                                      ) from None
        except EntryNotFoundError:
            return None
        except Exception as err:  # repository not found, gated, HTTP errors
            raise CheckpointError(f"could not fetch {name} of {repo_id!r} from the hub: {err}") from None

    return fetch
