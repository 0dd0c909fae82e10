"""Physical voxel size, normalised to nanometres whatever unit the file used."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Spellings seen in OME-XML, OME-Zarr (UDUNITS names), ImageJ and HDF5 attributes.
_NM_PER_UNIT = {
    "pm": 1e-3,
    "picometer": 1e-3,
    "å": 0.1,
    "angstrom": 0.1,
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "µm": 1e3,
    "μm": 1e3,  # Greek mu, not the micro sign
    "um": 1e3,
    "micron": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "\\u00b5m": 1e3,  # ImageJ writes the escape literally
    "mm": 1e6,
    "millimeter": 1e6,
    "cm": 1e7,
    "centimeter": 1e7,
    "m": 1e9,
    "meter": 1e9,
}


def nm_per_unit(unit: str | None, default: str | None = None) -> float | None:
    """Nanometres per ``unit``; None if the unit is unknown (better no size than a wrong one)."""
    unit = unit if unit else default
    if unit is None:
        return None
    return _NM_PER_UNIT.get(str(unit).strip().lower())


@dataclass(frozen=True)
class VoxelSize:
    """Voxel edge lengths in nanometres, (z, y, x); an axis the file does not record is None."""

    z: float | None
    y: float | None
    x: float | None

    @classmethod
    def from_values(
        cls,
        zyx: tuple[float | None, float | None, float | None],
        units: str | None | tuple[str | None, str | None, str | None],
    ) -> VoxelSize | None:
        """Convert ``zyx`` given in ``units`` (one for all axes or one per axis).

        An axis with a missing, non-positive or unknown-unit value becomes None; the
        result is None when no axis is usable.
        """
        per_axis = units if isinstance(units, tuple) else (units,) * 3
        vals: list[float | None] = []
        for v, unit in zip(zyx, per_axis, strict=True):
            factor = nm_per_unit(unit)
            ok = v is not None and factor is not None and float(v) > 0
            vals.append(float(v) * factor if ok else None)  # type: ignore[operator, arg-type]
        return None if all(v is None for v in vals) else cls(*vals)

    def to_dict(self) -> dict[str, float | str | None]:
        return {**asdict(self), "unit": "nm"}
