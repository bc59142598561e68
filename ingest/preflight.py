"""``tessera ingest wsi --dry-run``'s look at the slides themselves: each local slide opened (its header: levels,
MPP, objective power, colour profile; no pixels), to say at which level and resolution it would be tiled, how large
its tile grid is before the tissue mask, and which slides would fail to open. Slides on object storage are left to
the run: opening one means downloading it."""

from __future__ import annotations

from collections.abc import Callable

from ingest.colour import usable_profile
from ingest.config import WsiIngestConfig
from ingest.decisions import decide
from ingest.describe import id_list
from ingest.slides import SlideReader, open_slide
from ingest.tiling import grid_size
from ingest.units import Unit
from ingest.wsi import scale_mismatch, tile_geometry
from shards.local_files import is_remote


def _header_reader(path: str) -> SlideReader:
    return open_slide(path, fast=False)  # the direct tile path probes pixels; a header needs none


def check_slides(
    units: list[Unit],
    cfg: WsiIngestConfig,
    open_reader: Callable[[str], SlideReader] = _header_reader,
    model_um: float | None = None,
) -> list[str]:
    """Lines for the terminal: slides grouped by the level and resolution they would be read at, with their tile
    grids; the slides that would fail, by reason; the warnings a run would record (slides by pseudonym), of
    tiles of another scale than ``model_um`` (the background model's training tiles' width) too."""
    groups: dict[tuple[int, float, float | None], list[int]] = {}  # -> [slides, tiles in their grids]
    failed: dict[str, list[str]] = {}
    warned: dict[str, list[str]] = {}
    local = [u for u in units if not is_remote(u.sources[0])]
    for unit in local:
        try:
            reader = open_reader(unit.sources[0])  # a multi-file slide's other files lie beside the first
        except Exception as exc:  # recorded as the run would record it
            failed.setdefault(decide(exc, 1, 1).reason, []).append(unit.id)
            continue
        try:
            g = tile_geometry(reader, cfg.tile_size, cfg.mpp, cfg.stride, cfg.magnification)
            w0, h0 = reader.level_dimensions[0]
            mpp = round(g.mpp * g.target_downsample, 3) if g.mpp else None
            _, colour = usable_profile(reader, cfg.color_profile == "apply")
        finally:
            reader.close()
        group = groups.setdefault((g.level, round(g.target_downsample, 3), mpp), [0, 0])
        group[0] += 1
        group[1] += grid_size(w0, h0, g.size0, g.stride0)
        mismatch = scale_mismatch(model_um, g.mpp * g.size0 if g.mpp else None, cfg.tile_size)
        for warning in g.warnings + [w for w in (mismatch, colour) if w]:
            warned.setdefault(warning, []).append(unit.id)
    lines = [f"slides checked: {len(local)} of {len(units)}"]
    if len(local) < len(units):
        lines[0] += f" ({len(units) - len(local)} on object storage: opened by the workers in the run)"
    for (level, ds, mpp), (n, grid) in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        where = f"{mpp:g} µm/px" if mpp is not None else "no MPP"
        lines.append(
            f"  {n} at level {level} ({ds:g} level-0 px per output px, {where}): "
            f"{grid:,} tile positions of {cfg.tile_size} px before the tissue mask"
        )
    lines += [f"would fail {len(ids)}: {reason}: {id_list(ids)}" for reason, ids in failed.items()]
    lines += [f"warning for {len(ids)}: {warning}: {id_list(ids)}" for warning, ids in warned.items()]
    return lines
