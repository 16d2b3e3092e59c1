"""Provenance: every data file records the model, checkpoint and settings that made its rows (in
its Parquet footer, under PROVENANCE_KEY), and a rerun refuses an output made otherwise, naming
the difference, unless told to redo those rows (--overwrite)."""

import json
from typing import Any, Dict, List, Optional

from ..sources import filesystem
from .files import PROVENANCE_KEY, DoneIds, read_done

__all__ = ["PROVENANCE_KEY", "ProvenanceMismatch", "check_provenance", "describe_difference", "resume_ids"]


class ProvenanceMismatch(ValueError):
    """The output holds rows made by another model or other settings."""


def check_provenance(
    output: str,
    provenances: Dict[str, List[str]],
    wanted: Dict[str, Any],
    overwrite: bool,
    storage_options: Optional[Dict[str, Any]] = None,
) -> List[str]:
    """Refuse an output holding rows of another provenance (naming the difference), or with
    `overwrite` delete those files so their rows are redone; returns the files deleted."""
    wanted_json = json.dumps(wanted, sort_keys=True)
    other = {p: files for p, files in provenances.items() if p != wanted_json}
    if not other:
        return []
    if not overwrite:
        found = next(iter(other))
        raise ProvenanceMismatch(
            f"{output} holds rows made with other settings ({sum(map(len, other.values()))} "
            f"files): {describe_difference(found, wanted)}; use another --output, or "
            f"--overwrite to redo those rows"
        )
    deleted = [f for files in other.values() for f in files]
    for url in deleted:
        fs, path = filesystem(url, storage_options)
        fs.rm(path)
    return deleted


def resume_ids(
    output: str, provenance: Dict[str, Any], overwrite: bool, storage_options: Optional[Dict[str, Any]] = None
) -> DoneIds:
    """The ids a rerun skips: refuses an output of other provenance (or, with `overwrite`, deletes
    those files first), then reads what is left (`read_done`)."""
    done, provenances = read_done(output, storage_options)
    if check_provenance(output, provenances, provenance, overwrite, storage_options):
        done, _ = read_done(output, storage_options)
    return done


def describe_difference(stored_json: str, wanted: Dict[str, Any]) -> str:
    """ "key: stored -> this run" for each setting that differs; a setting that is itself a JSON
    object (the everything-mode params) is compared key by key, as "params.key"."""
    try:
        stored = json.loads(stored_json)
    except ValueError:
        return "the stored files carry no provenance (written by an older version)"
    return ", ".join(_differences(stored, wanted))


def _differences(stored: Dict[str, Any], wanted: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if a == b:
            continue
        inner = [_json_object(a), _json_object(b)]
        if not prefix and all(x is not None for x in inner):
            out += _differences(inner[0], inner[1], f"{k}.")
        else:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _json_object(value: Any) -> Optional[Dict[str, Any]]:
    if isinstance(value, str) and value.startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None
