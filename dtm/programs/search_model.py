"""The search model of a results dataset: what remakes its search's filtered projections.

:func:`dtm.search.side_maxima.explained_peaks` needs the projections exactly as the search
made them (the micrograph's whitening, the CTF at each peak's defocus, the edge-mean and
variance normalisation); this module reads the micrograph and template files that a
dataset's attributes name and builds its :class:`~dtm.search.side_maxima.SearchModel`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from dtm.config.filters import PreprocessingFilters
from dtm.errors import DtmError
from dtm.io.mrc import read_micrograph
from dtm.physics.resample import fourier_crop
from dtm.runtime.tasks import load_template
from dtm.schema import ABERRATION_FIELDS, OPTICS_FIELDS
from dtm.search.prepare import Optics, filter_micrograph
from dtm.search.side_maxima import SearchModel

__all__ = ["search_model"]


@functools.lru_cache(maxsize=1)  # a template spectrum can take gigabytes
def _cached_model(micrograph_path: str, template_path: str, attrs_json: str) -> SearchModel | None:
    attrs = json.loads(attrs_json)
    pixel_size = float(attrs["pixel_size"])
    original = float(attrs.get("original_pixel_size") or pixel_size)
    crop = pixel_size if attrs.get("high_resolution_limit") else None
    config = json.loads(attrs.get("config") or "{}")
    try:
        filters = PreprocessingFilters.model_validate(
            config.get("preprocessing_filters") or {}
        ).settings(pixel_size)
        template = load_template(template_path, crop, pixel_size=original)
        image = read_micrograph(micrograph_path, pixel_size=original).data
    except (DtmError, ValueError, OSError):
        return None
    if crop is not None:
        image, _ = fourier_crop(image, original, new_pixel_size=crop)
    filtered, profile = filter_micrograph(image, pixel_size=pixel_size, filters=filters)
    shape = (int(filtered.shape[0]), int(filtered.shape[1]))
    return SearchModel(template, Optics.from_mapping(attrs), filters, profile, shape)


def search_model(attrs: Mapping[str, Any]) -> SearchModel | None:
    """The :class:`SearchModel` of a results dataset's attributes (its micrograph, template,
    optics and filter settings); None when the files cannot be read. The last one is kept
    per process (picking the same micrograph again reuses it)."""
    keys = ["pixel_size", "original_pixel_size", "high_resolution_limit", "config"]
    keys += [*OPTICS_FIELDS, *ABERRATION_FIELDS]
    subset = {key: attrs.get(key) for key in keys}
    return _cached_model(
        str(attrs.get("micrograph_path")),
        str(attrs.get("template_path")),
        json.dumps(subset, sort_keys=True, default=str),
    )
