"""Synthetic templates and micrographs with known particles (demo, tests, benchmarks).

The simulator is deliberately independent of the search's Fourier-slice projector: particles
are projected in real space (:func:`dtm.physics.projection.project_real_space`), so a search
that finds them checks the whole pipeline rather than agreeing with itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage
from scipy.spatial.transform import Rotation

from dtm.errors import ConfigError
from dtm.physics.ctf import ctf_2d
from dtm.physics.projection import project_real_space
from dtm.physics.rotations import euler_to_matrix, matrix_to_euler

# Lobes of the pseudo-molecule: centre and semi-axes (in units of the molecule's radius) and
# share of the atoms. Three unequal lobes off the axes make every orientation distinct.
_LOBES = (
    ((-0.25, 0.00, 0.00), (0.50, 0.28, 0.22), 0.50),
    ((0.35, 0.30, 0.10), (0.22, 0.22, 0.22), 0.30),
    ((0.10, -0.20, 0.45), (0.15, 0.15, 0.28), 0.20),
)
_ATOM_SIGMA = 1.8  # Å, roughly a carbon atom blurred by a B-factor of ~30 Å²
_LOW_FREQUENCY_SIGMA = 6.0  # pixels, correlation length of the smooth background noise


def simulate_template(
    box_size: int = 64, *, pixel_size: float = 1.5, n_atoms: int = 400, seed: int = 0
) -> np.ndarray:
    """A pseudo-atomic, asymmetric, positive density in a cubic box.

    Gaussian "atoms" (σ = 1.8 Å) fill three unequal ellipsoidal lobes; the atoms' centre of
    mass is the box centre ``d // 2`` and every atom lies within ``box_size / 3`` pixels of it.

    Parameters
    ----------
    box_size
        Edge ``d`` of the box in pixels.
    pixel_size
        Å per pixel (sets the atoms' width in pixels).
    n_atoms
        Number of atoms.
    seed
        Random seed.

    Returns
    -------
    numpy.ndarray
        float32 ``(d, d, d)`` indexed ``[z, y, x]``, non-negative.
    """
    if box_size < 8 or n_atoms < 1 or not pixel_size > 0:
        raise ConfigError(
            f"simulate_template: need box_size >= 8, n_atoms >= 1, pixel_size > 0; got "
            f"{box_size}, {n_atoms}, {pixel_size}"
        )
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_atoms, [share for _, _, share in _LOBES])
    atoms = []
    for (centre, semi_axes, _), count in zip(_LOBES, counts, strict=True):
        direction = rng.normal(size=(count, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        radius = rng.random(count) ** (1 / 3)  # uniform inside the ellipsoid
        atoms.append(np.asarray(centre) + direction * radius[:, None] * np.asarray(semi_axes))
    xyz = np.concatenate(atoms)
    xyz -= xyz.mean(axis=0)
    max_radius = box_size / 3.0
    xyz *= max_radius / np.linalg.norm(xyz, axis=1).max()  # (x, y, z) pixels from the centre

    # Splat each atom on its 8 neighbouring voxels (trilinear), then blur into Gaussians:
    # the same density as summing Gaussians, at the cost of one filter.
    volume = np.zeros((box_size,) * 3, dtype=np.float64)
    zyx = xyz[:, ::-1] + box_size // 2
    base = np.floor(zyx).astype(int)
    frac = zyx - base
    for corner in np.ndindex(2, 2, 2):
        offset = np.asarray(corner)
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
        np.add.at(volume, tuple((base + offset).T), weight)
    volume = scipy.ndimage.gaussian_filter(volume, _ATOM_SIGMA / pixel_size, mode="constant")
    return volume.astype(np.float32)


@dataclass
class PlantedParticle:
    """A particle put into a simulated micrograph.

    Attributes
    ----------
    pos_y, pos_x
        Top-left corner of the template box in the micrograph (pixels); the molecule's centre
        is at ``(pos_y + d // 2, pos_x + d // 2)``.
    phi, theta, psi
        ZYZ Euler angles, degrees.
    relative_defocus
        Defocus relative to the micrograph's, Å.
    """

    pos_y: int
    pos_x: int
    phi: float
    theta: float
    psi: float
    relative_defocus: float = 0.0


def _particle_image(
    template: np.ndarray, particle: PlantedParticle, optics: dict[str, Any]
) -> np.ndarray:
    """Negated, CTF-filtered projection in a ``2d`` box, molecule centre at pixel ``(d, d)``.

    The projection is zero-padded to twice its size before filtering so that the CTF's
    delocalised fringes are kept rather than wrapped around.
    """
    box = template.shape[0]
    rotation = euler_to_matrix(np.array([particle.phi, particle.theta, particle.psi]))
    projection = project_real_space(template, rotation)
    padded = np.zeros((2 * box, 2 * box), dtype=np.float64)
    start = box - box // 2  # puts the projection's centre d // 2 at the padded centre d
    padded[start : start + box, start : start + box] = -projection
    plain = {key: value for key, value in optics.items() if key != "mag_matrix"}
    ctf = ctf_2d(padded.shape, relative_defocus=(particle.relative_defocus,), **plain)[0]
    image = scipy.fft.irfft2(scipy.fft.rfft2(padded) * ctf, s=padded.shape)
    if optics.get("mag_matrix") is None:
        return image
    # Anisotropic magnification as Leopard-EM means it: the recorded image is image(A·r),
    # r = (y, x) from the molecule's centre (d, d); done in real space, apart from dtm's
    # Fourier-space model of it, so that a search finding these particles checks it.
    matrix = np.asarray(optics["mag_matrix"], dtype=np.float64).reshape(2, 2)
    centre = np.array([box, box], dtype=np.float64)
    return scipy.ndimage.affine_transform(image, matrix, offset=centre - matrix @ centre, order=3)


def simulate_micrograph(
    template: np.ndarray,
    shape: tuple[int, int],
    particles: Sequence[PlantedParticle],
    *,
    pixel_size: float,
    voltage: float = 300.0,
    spherical_aberration: float = 2.7,
    amplitude_contrast_ratio: float = 0.07,
    defocus_u: float = 10000.0,
    defocus_v: float = 10000.0,
    astigmatism_angle: float = 0.0,
    phase_shift: float = 0.0,
    b_factor: float = 0.0,
    signal_scale: float = 12.0,
    noise_sigma: float = 1.0,
    low_frequency_noise: float = 1.0,
    seed: int = 0,
    aberrations: Any = None,
) -> np.ndarray:
    """A micrograph holding the given particles in noise.

    Each particle is the template projected at its orientation (real space), negated (dark
    particles, SPEC "Contrast"), filtered with the CTF at ``defocus + relative_defocus``, and
    scaled so that its image has an L2 norm of ``signal_scale``: in white noise of
    ``noise_sigma`` an ideal matched filter would see it with an SNR of
    ``signal_scale / noise_sigma``. The molecule's centre lands on pixel
    ``(pos_y + d // 2, pos_x + d // 2)``; parts outside the micrograph are clipped.
    Noise: white Gaussian (σ = ``noise_sigma``) plus a smooth background (Gaussian-filtered
    noise, correlation length 6 px, σ = ``low_frequency_noise * noise_sigma``) for the
    whitening filter to remove.

    Parameters
    ----------
    template
        Density ``(d, d, d)`` ``[z, y, x]``, positive.
    shape
        ``(H, W)`` of the micrograph, pixels.
    particles
        The particles to plant.
    pixel_size
        Å per pixel.
    voltage, spherical_aberration, amplitude_contrast_ratio, defocus_u, defocus_v,
    astigmatism_angle, phase_shift, b_factor
        Optics: kV, mm, fraction, Å, Å, degrees, degrees, Å² (see :func:`ctf_2d`).
    signal_scale
        L2 norm of each particle's image (see above).
    noise_sigma
        Standard deviation of the white noise.
    low_frequency_noise
        Standard deviation of the smooth background, in units of ``noise_sigma``.
    seed
        Random seed of the noise.
    aberrations
        A mapping of Leopard-EM's ``even_zernikes``, ``odd_zernikes`` (to the CTF,
        :func:`ctf_2d`) and ``mag_matrix`` (each particle's filtered image resampled at
        ``A·r`` around its centre, in real space); default none.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)``.
    """
    height, width = shape
    template = np.asarray(template, dtype=np.float32)
    box = template.shape[0]
    optics = {
        "pixel_size": pixel_size,
        "voltage": voltage,
        "spherical_aberration": spherical_aberration,
        "amplitude_contrast_ratio": amplitude_contrast_ratio,
        "defocus_u": defocus_u,
        "defocus_v": defocus_v,
        "astigmatism_angle": astigmatism_angle,
        "phase_shift": phase_shift,
        "b_factor": b_factor,
        **(aberrations or {}),
    }
    micrograph = np.zeros((height, width), dtype=np.float64)
    for particle in particles:
        image = _particle_image(template, particle, optics)
        image *= signal_scale / np.linalg.norm(image)
        # Padded pixel (d, d) goes to micrograph pixel (pos + d // 2): top-left of the 2d box.
        top, left = particle.pos_y + box // 2 - box, particle.pos_x + box // 2 - box
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + 2 * box, height), min(left + 2 * box, width)
        if y0 < y1 and x0 < x1:
            micrograph[y0:y1, x0:x1] += image[y0 - top : y1 - top, x0 - left : x1 - left]

    rng = np.random.default_rng(seed)
    micrograph += noise_sigma * rng.normal(size=(height, width))
    if low_frequency_noise > 0:
        smooth = scipy.ndimage.gaussian_filter(
            rng.normal(size=(height, width)), _LOW_FREQUENCY_SIGMA, mode="wrap"
        )
        micrograph += low_frequency_noise * noise_sigma * smooth / smooth.std()
    return micrograph.astype(np.float32)


def random_particles(
    n: int,
    shape: tuple[int, int],
    box_size: int,
    *,
    orientations: np.ndarray | None = None,
    defocus_values: Sequence[float] = (0.0,),
    min_separation: float | None = None,
    seed: int = 0,
) -> list[PlantedParticle]:
    """Random particles whose boxes lie inside the micrograph and do not crowd each other.

    Parameters
    ----------
    n
        Number of particles.
    shape
        ``(H, W)`` of the micrograph, pixels.
    box_size
        Template box ``d``, pixels.
    orientations
        Euler angles ``(m, 3)`` (degrees) to draw from, e.g. a search grid so that the planted
        poses are exactly on it; uniformly random on SO(3) if not given.
    defocus_values
        Relative defocus values (Å) to draw from.
    min_separation
        Smallest distance between particle centres, pixels; default ``box_size``.
    seed
        Random seed.

    Returns
    -------
    list of PlantedParticle

    Raises
    ------
    ConfigError
        If the particles do not fit.
    """
    height, width = shape
    separation = float(box_size if min_separation is None else min_separation)
    if box_size > height or box_size > width:
        raise ConfigError(f"box {box_size} px does not fit in a {height} x {width} micrograph")
    rng = np.random.default_rng(seed)
    corners: list[tuple[int, int]] = []
    for _ in range(1000 * max(n, 1)):
        if len(corners) == n:
            break
        y = int(rng.integers(0, height - box_size + 1))
        x = int(rng.integers(0, width - box_size + 1))
        if all(math.hypot(y - cy, x - cx) >= separation for cy, cx in corners):
            corners.append((y, x))
    if len(corners) < n:
        raise ConfigError(
            f"cannot place {n} particles {separation:g} px apart in a {height} x {width} "
            f"micrograph (placed {len(corners)})"
        )
    if orientations is None:
        matrices = Rotation.random(n, random_state=rng).as_matrix()
        euler = matrix_to_euler(matrices).reshape(n, 3)
    else:
        table = np.asarray(orientations, dtype=np.float64).reshape(-1, 3)
        euler = table[rng.integers(0, len(table), size=n)]
    defocus = rng.choice(np.asarray(defocus_values, dtype=np.float64), size=n)
    return [
        PlantedParticle(y, x, float(phi), float(theta), float(psi), float(delta))
        for (y, x), (phi, theta, psi), delta in zip(corners, euler, defocus, strict=True)
    ]
