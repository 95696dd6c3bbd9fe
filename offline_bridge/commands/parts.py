"""One conversion written by many processes: `convert --part I/N` writes part I's output files into the parts
area beside OUT_DIR, and `finalize OUT_DIR` checks every part and puts the output in place, byte for byte what
one `convert` writes. A SLURM array or a Kubernetes indexed job runs the parts (see README, "Many machines").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config.hf_config import copy_side_files
from ..errors import CheckpointError
from ..files.digest import sha256_file
from ..plan.parts import plan_digest, split_files
from ..readers import CheckpointReader
from ..transform.quant import AMAX_FILE
from ..transform.quant import CONFIG_FILE as QUANT_CONFIG_FILE
from ..write.completed import META, completed_files, recorded_files
from ..write.json_file import write_json
from ..write.manifest import write_manifest
from ..write.parts_area import PartsArea, area_of, part_locks, read_part_manifests
from ..write.quant_files import write_quant
from ..write.staging import OutputDir
from ..write.writer import INDEX_FILE, write_index, write_weights
from .planning import Conversion

__all__ = ["finalize", "write_extras", "write_part"]

log = logging.getLogger(__name__)


def write_extras(
    conversion: Conversion, reader: CheckpointReader, directory: Path
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The files beside the weights: quant amax and config, config.json, tokenizer files. Their names, and the
    sha256 of the tensors among them (as `write_weights`)."""
    names, digests = ["config.json"], {}
    if conversion.quant is not None:
        digests = write_quant(conversion.quant, conversion.plan, conversion.family, reader, directory)
        names += [AMAX_FILE, QUANT_CONFIG_FILE]
    write_json(directory / "config.json", conversion.config)
    if conversion.model_dir is not None:
        names += copy_side_files(conversion.model_dir, directory)
    return names, digests


def write_part(
    conversion: Conversion,
    reader: CheckpointReader,
    area: PartsArea,
    manifest: dict[str, Any],
    *,
    resume: bool,
    **writing: Any,
) -> None:
    """Write part ``area.index`` of ``area.count``: its files (those complete from an earlier run kept with
    ``resume``), part 0 the side files too, then its part manifest."""
    plan = conversion.plan
    files = split_files(plan, area.count)[area.index]
    log.info("part %d of %d: %d of %d files", area.index, area.count, len(files), len(plan.files))
    if not resume:
        area.clear(files)
    kept = completed_files(area.path, plan, files) if resume else {}
    write_weights(plan, reader, area.path, files=files, kept=kept, resumable=True, **writing)
    extras, extra_digests = {}, {}
    if area.index == 0:
        names, extra_digests = write_extras(conversion, reader, area.path)
        if write_index(plan, area.path):
            names.append(INDEX_FILE)
        extras = {name: sha256_file(area.path / name, None, "output file") for name in sorted(names)}
    area.write_manifest(
        {"plan_sha256": plan_digest(plan), "files": list(files), "extras": extras, "extra_digests": extra_digests}
        | manifest
    )


def finalize(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Check that every part of OUT_DIR's parts area is present and intact, write the manifest, and put the
    output in place. A missing, damaged or foreign part fails, naming it; the area is then kept as it is."""
    out, area = area_of(out_dir)
    with OutputDir(out_dir, overwrite=overwrite) as output:
        parts = read_part_manifests(area)
        with part_locks(area, out):
            digests = _checked(area, parts)
            first = parts[0]
            with output.adopted(area) as directory:
                write_manifest(directory, "convert", first["options"], first["sources"], digests)
    return out


def _checked(area: Path, parts: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The tensors' sha256 of every file, once every part is present, of the same plan, and intact."""
    count = parts[0]["parts"] if parts else 0
    if not parts or any(part["parts"] != count for part in parts):
        split = sorted({part["parts"] for part in parts})
        raise CheckpointError(f"{area}: parts of different splits (N = {split}); run every part with one N")
    missing = sorted(set(range(count)) - {part["part"] for part in parts})
    if missing:
        listed = ", ".join(f"{i}/{count}" for i in missing[:10])
        raise CheckpointError(f"{area}: part(s) {listed} missing; run `convert ... --part I/{count}` for them")
    for key in ("plan_sha256", "options", "sources"):
        if any(part.get(key) != parts[0].get(key) for part in parts):
            raise CheckpointError(f"{area}: the parts disagree on {key}: they were not run with the same inputs")
    digests: dict[str, dict[str, str]] = {}
    found = recorded_files(area, [name for part in parts for name in part["files"]])
    for part in parts:
        for name in part["files"]:
            if found[name] is None:
                index = part["part"]
                raise CheckpointError(
                    f"{area / name}: missing or damaged; run `convert ... --part {index}/{count} --resume` again"
                )
            digests[name] = found[name]
    first = next(part for part in parts if part["part"] == 0)
    for name, expected in first["extras"].items():
        if not (area / name).is_file() or sha256_file(area / name, None, "output file") != expected:
            raise CheckpointError(f"{area / name}: missing or damaged; run `convert ... --part 0/{count}` again")
    stray = sorted({p.name for p in area.iterdir()} - {META, *digests, *first["extras"]})
    if stray:
        raise CheckpointError(f"{area}: holds {', '.join(stray[:5])}, which no part wrote; remove it")
    return digests | first["extra_digests"]
