"""Templates from atomic models: the scattering table, the potential on a grid (against the
analytic transform of the scattering factors), its conventions, its filters, and exactness
under slabs, threads, the numba kernel and a Dask cluster."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gemmi
import numpy as np
import pytest
import scipy.fft
import scipy.integrate
import scipy.ndimage

from dtm.config.template import TemplateSimulation, default_box
from dtm.errors import InputError
from dtm.io.curves import read_curve
from dtm.io.model import read_model
from dtm.physics import exposure, potential
from dtm.physics.ctf import electron_wavelength
from dtm.physics.projection import project_real_space
from dtm.physics.rotations import euler_to_matrix
from dtm.physics.scattering import PENG_1996, scattering_coefficients, scattering_factor
from dtm.programs.template import simulate_template

BUNDLED = Path(__file__).resolve().parent.parent / "dtm" / "data" / "7ddo.pdb.gz"


def write_model(path: Path, atoms: list[tuple[str, tuple[float, float, float]]], **kw) -> Path:
    """A PDB file with one residue per atom (gemmi writes it): ``(element, (x, y, z))``.

    Keywords: ``b`` (B-factor, Å²), ``occ``, ``water`` (indices of atoms in HOH residues).
    """
    structure = gemmi.Structure()
    model = gemmi.Model(1)
    chain = gemmi.Chain("A")
    for i, (element, xyz) in enumerate(atoms):
        residue = gemmi.Residue()
        residue.name = "HOH" if i in kw.get("water", ()) else "UNK"
        residue.seqid = gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name = element
        atom.element = gemmi.Element(element)
        atom.pos = gemmi.Position(*xyz)
        atom.b_iso = kw.get("b", 20.0)
        atom.occ = kw.get("occ", {}).get(i, 1.0)
        residue.add_atom(atom)
        chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    structure.setup_entities()
    structure.write_pdb(str(path))
    return path


def spectrum_of(atoms_zyx: np.ndarray, element: str, blur: float, grid: potential.Grid, **kw):
    a, b = scattering_coefficients([element] * len(atoms_zyx))
    return potential.potential_spectrum(atoms_zyx, a, b + blur, grid, **kw)


def test_table_is_the_one_gemmi_carries():
    # gemmi transcribes International Tables C 4.3.2.2 (Peng 1996) independently.
    compared = 0
    for name, (a, b) in PENG_1996.items():
        coefficients = gemmi.Element(name.capitalize()).c4322.get_coefs()
        np.testing.assert_allclose(coefficients[:5], a, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(coefficients[5:], b, rtol=1e-6, err_msg=name)
        compared += 1
    assert compared == 98  # H to Cf


def test_unknown_element_is_one_line():
    with pytest.raises(InputError, match=r"no electron scattering factor for element\(s\) XX"):
        scattering_coefficients(["C", "Xx"])


@pytest.mark.parametrize(("element", "blur", "oversampling"), [("C", 5.0, 2), ("S", 0.5, 3)])
def test_one_atom_is_the_transform_of_its_scattering_factor(element, blur, oversampling):
    # An atom at the centre voxel: the fine grid holds its potential integrated over fine
    # voxels, whose DFT is Σ_m F(k + m / p_f) over the aliases m (F = f(q) exp(−B q²/4)
    # times a sinc per axis for the voxel, times the phase of the centre n // 2); the crop
    # keeps the n³ lowest frequencies. Its zero frequency (the volume's sum) is Σ a_k.
    n, pixel = 32, 1.2
    grid = potential.Grid(n, pixel, oversampling)
    spectrum = spectrum_of(np.zeros((1, 3)), element, blur, grid)
    fine = grid.fine_pixel
    k = [
        np.fft.fftfreq(n)[:, None, None] / pixel,
        np.fft.fftfreq(n)[None, :, None] / pixel,
        np.fft.rfftfreq(n)[None, None, :] / pixel,
    ]
    expected = np.zeros(spectrum.shape)
    for m in np.ndindex(7, 7, 7):
        shifted = [kd + (md - 3) / fine for kd, md in zip(k, m, strict=True)]
        q = np.sqrt(sum(kd**2 for kd in shifted))
        transfer = (
            np.sinc(shifted[0] * fine) * np.sinc(shifted[1] * fine) * np.sinc(shifted[2] * fine)
        )
        expected = expected + scattering_factor(element, q, blur) * transfer
    expected = expected * np.exp(-2j * np.pi * (k[0] + k[1] + k[2]) * pixel * (n // 2))
    total = sum(PENG_1996[element][0])
    assert spectrum[0, 0, 0].real == pytest.approx(total, rel=5e-4)
    np.testing.assert_allclose(spectrum, expected, atol=3e-4 * total)


def test_b_factor_broadens_as_predicted(tmp_path):
    # Two templates of one atom, B = 20 and 100 Å²: the ratio of their spectra is
    # exp(−(B₂ − B₁)/4 · q²/4), dtm blurring by B/4 as cisTEM and ttsim3d (a blur of
    # exp(−B' s²), s = q/2, B' = B/4).
    n, pixel = 32, 1.0
    volumes = []
    for b in (20.0, 100.0):
        model = write_model(tmp_path / f"b{b:g}.pdb", [("N", (0.0, 0.0, 0.0))], b=b)
        volumes.append(simulate_template(model, pixel_size=pixel, box=n)[0].astype(np.float64))
    k2 = (
        np.fft.fftfreq(n)[:, None, None] ** 2
        + np.fft.fftfreq(n)[None, :, None] ** 2
        + np.fft.rfftfreq(n)[None, None, :] ** 2
    ) / pixel**2
    sharp, blurred = (scipy.fft.rfftn(v) for v in volumes)
    band = k2 <= 0.35**2  # where both spectra are well above float32 rounding
    ratio = (blurred[band] / sharp[band]).real
    np.testing.assert_allclose(ratio, np.exp(-(100.0 - 20.0) / 4 * k2[band] / 4), rtol=2e-3)
    # In real space: the second moment about the centre grows by (80/4)/(8π²) Å² per axis.
    z = (np.arange(n) - n // 2) * pixel
    profiles = [v.sum(axis=(1, 2)) for v in volumes]
    moments = [float((z**2 * p).sum() / p.sum()) for p in profiles]
    assert moments[1] - moments[0] == pytest.approx(20.0 / (8 * math.pi**2), rel=0.02)


def test_sum_is_the_scaled_scattering_factor_at_zero(tmp_path):
    # Volume sum = 1.043 λ / p² × Σ_atoms occupancy × Σ_k a_k (cisTEM's and ttsim3d's unit).
    model = write_model(
        tmp_path / "two.pdb", [("O", (0.0, 0.0, 0.0)), ("Fe", (3.0, 1.0, -2.0))], occ={1: 0.5}
    )
    pixel = 1.5
    volume, record = simulate_template(model, pixel_size=pixel, box=24, voltage=200.0)
    expected = sum(PENG_1996["O"][0]) + 0.5 * sum(PENG_1996["FE"][0])
    scale = 1.043 * electron_wavelength(200.0) / pixel**2
    assert float(volume.astype(np.float64).sum()) == pytest.approx(scale * expected, rel=1e-3)
    assert record["voltage"] == 200.0 and record["atoms"] == 2


def test_centre_axes_and_hand(tmp_path):
    # An asymmetric model, shifted far from the origin: S 6 Å along +x, O 9 Å along +y,
    # N 12 Å along +z of the centre (the mean of the atoms, with the C that balances them).
    # The array is [z, y, x], centre at n // 2: the model's x along the last axis.
    offset = np.array([140.0, -60.0, 33.0])
    atoms = [
        ("S", (6.0, 0.0, 0.0)),
        ("O", (0.0, 9.0, 0.0)),
        ("N", (0.0, 0.0, 12.0)),
        ("C", (-6.0, -9.0, -12.0)),
    ]
    shifted = [(e, tuple(np.add(xyz, offset))) for e, xyz in atoms]
    model = write_model(tmp_path / "asym.pdb", shifted, b=10.0)
    n, pixel = 40, 1.5
    volume, record = simulate_template(model, pixel_size=pixel, box=n)
    np.testing.assert_allclose(record["centre_angstrom"], offset, atol=1e-3)
    c = n // 2
    assert np.unravel_index(int(volume.argmax()), volume.shape) == (c, c, c + 4)  # the S
    for _, (x, y, z) in atoms[1:]:  # each atom a local maximum where it belongs
        index = (c + round(z / pixel), c + round(y / pixel), c + round(x / pixel))
        around = volume[tuple(slice(i - 1, i + 2) for i in index)]
        assert volume[index] == around.max() > 0.1 * volume.max()
    # the mirror image (x → −x) of the S position holds nothing
    assert volume[c, c, c - 4] < 0.01 * volume.max()


def test_volume_is_real_and_positive_for_a_real_model():
    volume, record = simulate_template(BUNDLED, pixel_size=3.0, box=48)
    assert volume.dtype == np.float32 and volume.shape == (48, 48, 48)
    assert np.isfinite(volume).all()
    assert record["atoms"] == 6468 and record["oversampling"] == 4
    # The protein is positive: smoothed over a voxel (which removes the ripples that
    # cropping the spectrum at Nyquist leaves), nowhere negative but for rounding.
    assert volume.sum() > 0
    smooth = scipy.ndimage.gaussian_filter(volume.astype(np.float64), 1.0, mode="wrap")
    assert smooth.min() > -1e-3 * smooth.max()
    # The potential's centre of mass is the model's centre (voxel 24), within a voxel.
    positive = np.clip(volume, 0, None)
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = positive.sum(axis=other)
        assert abs(float((np.arange(48) * profile).sum() / profile.sum()) - 24) < 1.0


def test_slabs_threads_kernel_and_cluster_never_change_the_volume(two_workers):
    rng = np.random.default_rng(3)
    zyx = rng.uniform(-9, 9, size=(300, 3))
    elements = rng.choice(["C", "N", "O", "S"], size=300)
    a, b = scattering_coefficients(elements)
    beta = b + rng.uniform(2, 30, size=(300, 1))
    grid = potential.Grid(24, 1.0, 2)
    reference = potential.potential_spectrum(zyx, a, beta, grid, compiled=False)
    with ThreadPoolExecutor(3) as threads:
        for kwargs in (
            {"slab_planes": 5},
            {"slab_planes": 48, "threads": 2},
            {"slab_planes": 6, "executor": threads},
            {"slab_planes": 7, "executor": two_workers.get_executor(pure=False)},
        ):
            result = potential.potential_spectrum(zyx, a, beta, grid, **kwargs)
            np.testing.assert_array_equal(result, reference, err_msg=str(kwargs))


def test_numba_kernel_adds_exactly_as_numpy():
    kernel = potential.numba_add_cubes()
    if kernel is None:
        pytest.skip("numba unavailable (DTM_NO_NUMBA set)")
    rng = np.random.default_rng(0)
    cubes = rng.random((40, 7, 7, 7))
    first = np.column_stack(
        [rng.integers(-8, 14, 40), rng.integers(-8, 20, 40), rng.integers(-8, 20, 40)]
    ).astype(np.int64)
    slabs = [np.zeros((10, 20, 20)), np.zeros((10, 20, 20))]
    potential.add_cubes_numpy(slabs[0], 3, cubes, first)
    kernel(slabs[1], 3, cubes, first)
    assert slabs[0].any()
    np.testing.assert_array_equal(slabs[0], slabs[1])


def test_default_oversampling_and_box():
    assert potential.default_oversampling(1.0, 400) == 2  # ttsim3d's 2 from 0.75 to 1.5 Å
    assert potential.default_oversampling(1.5, 96) == 2
    assert potential.default_oversampling(3.0, 64) == 4
    assert potential.default_oversampling(0.6, 128) == 1
    assert potential.default_oversampling(3.0, 512) == 3  # fine grid ≤ 1536
    box = default_box(63.7, 1.0)
    assert box % 2 == 0 and box >= 2 * (63.7 + 10) and box <= 2 * (63.7 + 10) + 8


def test_dose_filter_is_the_mean_attenuation_over_the_exposure():
    n, pixel, start, end = 32, 1.0, 5.0, 40.0
    values = exposure.dose_filter(n, pixel, start, end)
    k = exposure.frequency_radius(n) / pixel
    for index in [(0, 0, 1), (0, 3, 4), (5, 11, 9), (16, 16, 16)]:
        frequency = float(k[index])
        critical = 0.245 * frequency**-1.665 + 2.81  # Grant & Grigorieff (2015)
        mean, _ = scipy.integrate.quad(
            lambda dose, ne=critical: math.exp(-dose / (2 * ne)), start, end
        )
        assert values[index] == pytest.approx(mean / end, rel=1e-9)
    assert values[0, 0, 0] == pytest.approx((end - start) / end)
    assert 0 <= values.min() and values.max() <= 1


def test_detector_curves(tmp_path):
    star = tmp_path / "mtf.star"
    star.write_text(
        "data_mtf\nloop_\n_rlnResolutionInversePixel\n_rlnMtfValue\n0.0 1.0\n0.25 0.6\n0.5 0.2\n"
    )
    frequencies, values = read_curve(star)
    np.testing.assert_array_equal(frequencies, [0.0, 0.25, 0.5])
    text = tmp_path / "dqe.txt"
    text.write_text("# frequency value\n0, 0.8\n0.5, 0.4\n")
    assert read_curve(text)[1].tolist() == [0.8, 0.4]
    grid = exposure.curve_filter(16, frequencies, values)
    k = exposure.frequency_radius(16)
    assert grid[0, 0, 0] == 1.0 and grid[0, 0, 4] == pytest.approx(0.6)  # |k| = 0.25
    assert grid[8, 8, 8] == pytest.approx(0.2)  # beyond the curve: its last value
    assert grid[0, 2, 3] == pytest.approx(np.interp(k[0, 2, 3], frequencies, values))
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\n0.3 0.5\n0.2 0.4\n")
    with pytest.raises(InputError, match=r"^MTF .*bad.txt: frequencies do not increase$"):
        read_curve(bad, "MTF")
    bad.write_text("not a curve\n")
    with pytest.raises(InputError, match=r"bad.txt: expected a STAR loop"):
        read_curve(bad)


def test_filters_multiply_the_plain_template(tmp_path):
    model = write_model(tmp_path / "m.pdb", [("C", (0.0, 0.0, 0.0)), ("O", (4.0, 2.0, 1.0))])
    curve = tmp_path / "mtf.txt"
    curve.write_text("0 1\n0.5 0.3\n")
    n, pixel = 24, 1.0
    plain, _ = simulate_template(model, pixel_size=pixel, box=n)
    settings = TemplateSimulation(dose_weighting=[0, 30], mtf_path=curve, dqe_path=curve)
    filtered, record = simulate_template(model, pixel_size=pixel, box=n, settings=settings)
    assert record["dose_weighting"] == [0.0, 30.0] and record["mtf_path"] == str(curve)
    expected = (
        exposure.dose_filter(n, pixel, 0, 30)
        * exposure.curve_filter(n, [0, 0.5], [1, 0.3]) ** 1.5  # MTF × √DQE
    )
    ratio = scipy.fft.rfftn(filtered.astype(np.float64)) / scipy.fft.rfftn(plain)
    k = exposure.frequency_radius(n)
    band = k <= 0.3
    np.testing.assert_allclose(ratio[band].real, expected[band], rtol=2e-3, atol=1e-4)


def test_reading_a_model(tmp_path):
    atoms = [("C", (0.0, 0.0, 0.0)), ("H", (1.0, 0.0, 0.0)), ("O", (9.0, 0.0, 0.0))]
    path = write_model(tmp_path / "w.pdb", atoms, water={2}, occ={0: 0.4})
    model = read_model(path)
    assert model.elements.tolist() == ["C", "O"] and model.hydrogens == 1 and model.waters == 1
    assert model.occupancies.tolist() == pytest.approx([0.4, 1.0])
    np.testing.assert_allclose(model.centre, [10 / 3, 0, 0])  # every atom, H and water too
    dry = read_model(path, waters=False)
    assert dry.elements.tolist() == ["C"]
    np.testing.assert_allclose(dry.centre, model.centre)  # leaving waters out moves nothing
    real = read_model(BUNDLED)
    assert len(real.xyz) == 6468 and set(real.elements.tolist()) == {"C", "N", "O", "S", "ZN"}
    assert (real.occupancies == 0.5).sum() == 14  # the alternative conformations of His 228


def test_bad_models_are_one_line(tmp_path):
    with pytest.raises(InputError, match=r"^model .*none.pdb: file not found$"):
        read_model(tmp_path / "none.pdb")
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("data_x\nloop_\n_a.b\n'unterminated\n")
    with pytest.raises(InputError, match=r"^model .*garbage.cif: "):
        read_model(garbage)
    only_h = write_model(tmp_path / "h.pdb", [("H", (0.0, 0.0, 0.0))])
    with pytest.raises(InputError, match="no atoms left"):
        read_model(only_h)
    wide = write_model(tmp_path / "wide.pdb", [("C", (0.0, 0.0, 0.0)), ("C", (80.0, 0, 0))])
    with pytest.raises(InputError, match=r"2 atom\(s\) lie outside the 32-voxel box .* be 72\)$"):
        simulate_template(wide, pixel_size=1.5, box=32)
    sharpened = TemplateSimulation(additional_b_factor=-200.0)
    with pytest.raises(InputError, match="too negative"):
        simulate_template(wide, pixel_size=3.0, box=64, settings=sharpened)


def test_a_model_at_pose_r_projects_as_the_template_at_r(tmp_path):
    # A micrograph's particle at pose R is the template projected at R: P(x, y) = ∫ V(R r)
    # dz (docs/conventions.md), i.e. the model with its atoms moved from r to Rᵀ r, seen
    # along z. So the template of the moved model, summed along z, must be the template's
    # projection at R: the same centre, axes and hand.
    rotation = euler_to_matrix(np.array([30.0, 40.0, 50.0]))
    structure = gemmi.read_structure(str(BUNDLED))
    model = read_model(BUNDLED)
    for residue in structure[0].all():
        relative = np.array(residue.atom.pos.tolist()) - model.centre
        residue.atom.pos = gemmi.Position(*(rotation.T @ relative + model.centre))
    moved = tmp_path / "moved.pdb"
    structure.write_pdb(str(moved))
    n, pixel = 50, 3.0
    template, _ = simulate_template(BUNDLED, pixel_size=pixel, box=n)
    seen, record = simulate_template(moved, pixel_size=pixel, box=n)
    np.testing.assert_allclose(record["centre_angstrom"], model.centre, atol=1e-3)

    def detail(image: np.ndarray) -> np.ndarray:  # a band-pass: the molecule's features
        image = image.astype(np.float64)
        return scipy.ndimage.gaussian_filter(image, 0.7) - scipy.ndimage.gaussian_filter(image, 3)

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    expected = detail(project_real_space(template, rotation))
    assert correlation(detail(seen.sum(axis=0)), expected) > 0.99
    # The other hand (x → −x about the centre) or the inverse pose give other images.
    mirrored = np.roll(seen.sum(axis=0)[:, ::-1], 1, axis=1)
    assert correlation(detail(mirrored), expected) < 0.5
    assert correlation(detail(project_real_space(template, rotation.T)), expected) < 0.5
