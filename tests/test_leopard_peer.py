"""Optional: Leopard-EM itself reads dtm's peak table unchanged and gets dtm's CTF from it.

Runs only where ``DTM_LEOPARD_PYTHON`` names a Python interpreter with Leopard-EM 1.3
installed (it needs a newer Python and torch, so it lives in a venv of its own); Leopard-EM
runs in a subprocess there. Everything this checks without Leopard-EM is tested in
``test_leopard_interop.py`` and ``test_aberrations.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_results import synthetic_dataset

from dtm.config.match import PeaksConfig
from dtm.io.store import build_dataset
from dtm.io.tables import write_table
from dtm.physics import ctf_2d
from dtm.programs.peaks import peaks_table

PEER = os.environ.get("DTM_LEOPARD_PYTHON", "")


def _peer_reason() -> str | None:
    if not PEER:
        return "DTM_LEOPARD_PYTHON is not set (a Python interpreter with Leopard-EM 1.3)"
    try:
        done = subprocess.run(
            [PEER, "-c", "import leopard_em; print(leopard_em.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except OSError as error:
        return f"DTM_LEOPARD_PYTHON={PEER}: cannot run it ({error})"
    if done.returncode != 0:
        return f"DTM_LEOPARD_PYTHON={PEER}: leopard_em is not importable there"
    return None


REASON = _peer_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

#: Run by Leopard-EM's interpreter: its ParticleStack reads the table, its own helper turns
#: the table's columns into CTF arguments, its CTF function computes the filters.
SCRIPT = """
import json, sys
import numpy as np
import torch
from leopard_em.pydantic_models.data_structures.particle_stack import ParticleStack
from leopard_em.utils.ctf_utils import (
    _setup_ctf_kwargs_from_particle_stack,
    calculate_ctf_filter_stack_full_args,
)

table, out = sys.argv[1], sys.argv[2]
stack = ParticleStack(df_path=table, extracted_box_size=(40, 40), original_template_size=(24, 24))
if getattr(stack, "_df", None) is None:
    stack.load_df()
kwargs = _setup_ctf_kwargs_from_particle_stack(stack, (24, 24))
shape = kwargs.pop("template_shape")
row = stack._df.iloc[0]
ctf = calculate_ctf_filter_stack_full_args(
    shape, float(row["defocus_u"]), float(row["defocus_v"]),
    torch.tensor([float(row["relative_defocus"])]), torch.tensor([0.0]),
    astigmatism_angle=float(row["astigmatism_angle"]), **kwargs,
)[0, 0]
ctf = ctf if ctf.is_complex() else torch.complex(ctf, torch.zeros_like(ctf))
np.save(out, ctf.numpy())
print(json.dumps({
    "rows": len(stack._df),
    "even_zernikes": {k: float(v) for k, v in (kwargs["even_zernikes"] or {}).items()},
    "odd_zernikes": {k: float(v) for k, v in (kwargs["odd_zernikes"] or {}).items()},
    "mag_matrix": None if kwargs["mag_matrix"] is None else kwargs["mag_matrix"].ravel().tolist(),
    "pixel_size": kwargs["pixel_size"],
}))
"""


@pytest.mark.parametrize(
    "aberrations",
    [
        {},
        {
            "odd_zernikes": {"Z31c": 300.0, "Z33s": -120.0},
            "even_zernikes": {"Z44c": 900.0, "Z60": -2000.0},
            "mag_matrix": [1.03, 0.01, -0.02, 0.98],
        },
    ],
    ids=["plain", "aberrations"],
)
def test_leopard_em_reads_dtms_peak_table(aberrations: dict, tmp_path: Path) -> None:
    maps, attrs = synthetic_dataset("m1")
    ds = build_dataset(maps, pixel_size=2.0, attrs={**attrs, **aberrations})
    table = peaks_table(ds, PeaksConfig(metric="scaled_mip"))
    write_table(table, tmp_path, "peaks")
    script = tmp_path / "leopard_reads.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [PEER, str(script), str(tmp_path / "peaks.csv"), str(tmp_path / "ctf.npy")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["rows"] == len(table)
    assert seen["pixel_size"] == pytest.approx(float(attrs["pixel_size"]))  # refined_pixel_size
    assert seen["even_zernikes"] == aberrations.get("even_zernikes", {})
    assert seen["odd_zernikes"] == aberrations.get("odd_zernikes", {})
    mag_matrix = aberrations.get("mag_matrix")
    if mag_matrix is None:
        assert seen["mag_matrix"] is None
    else:
        assert seen["mag_matrix"] == pytest.approx(mag_matrix)
    row = pd.read_csv(tmp_path / "peaks.csv").iloc[0]
    ours = ctf_2d(
        (24, 24),
        pixel_size=row.refined_pixel_size,
        voltage=row.voltage,
        spherical_aberration=row.spherical_aberration,
        amplitude_contrast_ratio=row.amplitude_contrast_ratio,
        defocus_u=row.defocus_u,
        defocus_v=row.defocus_v,
        astigmatism_angle=row.astigmatism_angle,
        phase_shift=row.phase_shift,
        b_factor=row.ctf_B_factor,
        relative_defocus=[row.relative_defocus],
        **aberrations,
    )[0]
    np.testing.assert_allclose(ours, np.load(tmp_path / "ctf.npy"), atol=1e-4)
