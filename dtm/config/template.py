"""The settings of a template simulated from an atomic model (``dtm template`` and the
``template_simulation:`` section of a search that names ``template_model_path``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from dtm.config.base import InputFile, NonNegative, Positive, PositiveInt, _Model, _Problem

#: Room left around the model's atoms by the default box, Å (each side).
BOX_MARGIN = 10.0


class TemplateSimulation(_Model):
    """How a template is made from an atomic model (see From a model in the docs)."""

    b_factor_scaling: float = 1.0
    """Multiplies every atom's B-factor (ttsim3d's b_factor_scaling)."""
    additional_b_factor: float = 0.0
    """Added to every atom's B-factor after scaling, Å² (ttsim3d's additional_b_factor). As
    in cisTEM and ttsim3d, each atom is blurred by a quarter of the result."""
    dose_weighting: Annotated[list[NonNegative], Field(min_length=2, max_length=2)] | None = None
    """[start, end] exposure, e⁻/Å²: weight the template by the signal that radiation damage
    leaves over that exposure (Grant & Grigorieff 2015 critical exposure); off by default."""
    mtf_path: InputFile | None = None
    """Multiply by this detector MTF (RELION STAR or two-column text file; cycles/pixel):
    what ttsim3d's apply_dqe does with its mtf_reference."""
    dqe_path: InputFile | None = None
    """Weight by the square root of this detector DQE curve (same formats as mtf_path)."""
    oversampling: PositiveInt | None = None
    """Integrate on a grid this many times finer, then Fourier-crop (default: fine voxels of
    at most 0.75 Å, as ttsim3d's default, and a fine grid of at most 1536 voxels a side)."""
    waters: bool = True
    """Keep the model's water molecules (false: leave them out)."""

    @model_validator(mode="after")
    def _exposure(self) -> TemplateSimulation:
        dose = self.dose_weighting
        if dose is not None and not dose[0] < dose[1]:
            raise _Problem("needs start < end (e⁻/Å²)", "dose_weighting", dose)
        return self

    def record(self) -> dict[str, Any]:
        """The settings as JSON-safe builtins (for ``job.json`` and dataset attributes)."""
        data: dict[str, Any] = self.model_dump(mode="json")
        return data


def default_box(radius: float, pixel_size: Positive) -> int:
    """The default template box for a model of ``radius`` Å: the smallest even size of at
    least ``2 (radius + 10 Å) / pixel_size`` voxels whose FFTs are fast (factors 2, 3, 5)."""
    import scipy.fft  # noqa: PLC0415 (keeps the configuration module light)

    wanted = max(8, int(-(-2 * (radius + BOX_MARGIN) // pixel_size)))
    size = scipy.fft.next_fast_len(wanted, real=True)
    while size % 2:
        size = scipy.fft.next_fast_len(size + 1, real=True)
    return int(size)
