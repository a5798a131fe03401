"""Held-out micrographs for the detection benchmark, from a simulator apart from dtm's own.

``dtm.physics.simulate`` (what the tests use) plants particles in white plus smooth Gaussian noise,
at the template's own centre, on the search grid when asked. This simulator is stronger and
shares none of that code: molecules of several shapes, off-grid orientations (uniform on
SO(3)), sub-pixel positions, relative defocus between the search planes, counting (Poisson)
noise on a 1/f background, and each particle scaled to a chosen *ideal matched-filter SNR*:

    SNR² = (1/n) Σ_k |S(k)|² / P(k)

with ``S`` the particle's image (n pixels, CTF applied, padded box) and ``P(k)`` the noise's
power spectral density per pixel — the SNR of the best linear detector that knows the
particle's exact image and the noise spectrum. dtm's whitening estimates ``P`` from the
micrograph; its grid and the unknown pose cost part of that SNR, which is what the benchmark
measures.

Only the CTF comes from dtm (:func:`dtm.physics.ctf.ctf_2d`, checked against published
values in the tests); projection, shapes, noise and placement are written here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.ndimage
from scipy.spatial.transform import Rotation

from dtm.io.mrc import write_map
from dtm.physics.ctf import ctf_2d

#: Lobes of each molecule shape: (centre, semi-axes) in units of the molecule's radius.
SHAPES: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    # Three unequal lobes (a compact, asymmetric globule).
    "globule": [
        ((-0.3, 0.0, 0.1), (0.45, 0.35, 0.3)),
        ((0.35, 0.25, -0.1), (0.3, 0.25, 0.25)),
        ((0.1, -0.35, 0.3), (0.2, 0.2, 0.25)),
    ],
    # A bent rod of four beads (elongated, like a filament segment or an antibody arm).
    "rod": [
        ((-0.75, -0.1, 0.0), (0.25, 0.2, 0.2)),
        ((-0.25, 0.0, 0.05), (0.28, 0.22, 0.22)),
        ((0.25, 0.1, 0.0), (0.28, 0.22, 0.22)),
        ((0.7, 0.35, -0.1), (0.22, 0.2, 0.2)),
    ],
    # A flat L of five plates (an open, planar complex).
    "ell": [
        ((-0.6, -0.6, 0.0), (0.3, 0.3, 0.12)),
        ((-0.6, 0.0, 0.0), (0.3, 0.3, 0.12)),
        ((-0.6, 0.6, 0.0), (0.3, 0.3, 0.12)),
        ((0.0, -0.6, 0.0), (0.3, 0.3, 0.12)),
        ((0.6, -0.6, 0.05), (0.3, 0.3, 0.15)),
    ],
}


@dataclass
class Truth:
    """A planted particle: centre in micrograph pixels (sub-pixel) and its pose."""

    y: float
    x: float
    phi: float
    theta: float
    psi: float
    relative_defocus: float
    snr: float


def molecule(shape: str, box: int, pixel_size: float, seed: int) -> np.ndarray:
    """Density of a pseudo-atomic molecule ``[z, y, x]``, centre of mass at ``box // 2``.

    Atoms (Gaussians of σ = 1.5 Å) fill the shape's ellipsoidal lobes; the molecule spans
    about 0.6 of the box.
    """
    rng = np.random.default_rng(seed)
    lobes = SHAPES[shape]
    volumes = np.array([np.prod(axes) for _, axes in lobes])
    counts = rng.multinomial(3000, volumes / volumes.sum())
    points = []
    for (centre, axes), count in zip(lobes, counts, strict=True):
        direction = rng.normal(size=(count, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        radius = rng.random(count) ** (1 / 3)
        points.append(np.asarray(centre) + direction * radius[:, None] * np.asarray(axes))
    xyz = np.concatenate(points)
    xyz -= xyz.mean(axis=0)
    xyz *= 0.3 * box / np.abs(xyz).max()
    volume = np.zeros((box,) * 3)
    index = np.rint(xyz[:, ::-1] + box // 2).astype(int)
    np.add.at(volume, tuple(index.T), 1.0)
    return scipy.ndimage.gaussian_filter(volume, 1.5 / pixel_size).astype(np.float32)


def project(volume: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """``P(x, y) = ∫ V(R (x, y, z)) dz`` about the box centre, by trilinear resampling.

    ``R`` acts on column vectors ``(x, y, z)``; the volume is indexed ``[z, y, x]``, so in
    index order the matrix is R with both axes reversed.
    """
    box = volume.shape[0]
    centre = np.full(3, box // 2, dtype=np.float64)
    matrix = rotation[::-1, ::-1]
    rotated = scipy.ndimage.affine_transform(
        volume, matrix, offset=centre - matrix @ centre, order=1, mode="constant"
    )
    return rotated.sum(axis=0)


def noise_psd(shape: tuple[int, int], dose: float, background: float) -> np.ndarray:
    """Per-pixel noise power on the rfft grid: counting noise (``dose``) plus a 1/f
    background whose power is ``background × dose`` at 0.05 cycles/pixel."""
    ky = scipy.fft.fftfreq(shape[0])[:, None]
    kx = scipy.fft.rfftfreq(shape[1])[None, :]
    k = np.maximum(np.hypot(ky, kx), 1.0 / max(shape))
    return dose * (1.0 + background * 0.05 / k)


def micrograph(
    template: np.ndarray,
    shape: tuple[int, int],
    truths: list[Truth],
    *,
    optics: dict[str, float],
    dose: float,
    background: float,
    seed: int,
) -> np.ndarray:
    """Counts of a micrograph: Poisson of ``dose × (1 + signal)`` on a 1/f background."""
    height, width = shape
    box = template.shape[0]
    pad = 2 * box
    psd_box = noise_psd((pad, pad), dose, background)
    signal = np.zeros(shape)
    for truth in truths:
        rotation = Rotation.from_euler(
            "ZYZ", [truth.phi, truth.theta, truth.psi], degrees=True
        ).as_matrix()
        image = np.zeros((pad, pad))
        start = pad // 2 - box // 2
        image[start : start + box, start : start + box] = -project(template, rotation)
        cy, cx = math.floor(truth.y), math.floor(truth.x)
        ky = scipy.fft.fftfreq(pad)[:, None]
        kx = scipy.fft.rfftfreq(pad)[None, :]
        shift = np.exp(-2j * np.pi * (ky * (truth.y - cy) + kx * (truth.x - cx)))
        ctf = ctf_2d((pad, pad), relative_defocus=(truth.relative_defocus,), **optics)[0]
        spectrum = scipy.fft.rfft2(image) * ctf * shift
        # SNR² = (1/n) Σ_k |S_k|² / P_k over the full FFT grid (rfft halves counted twice).
        weight = np.full(spectrum.shape, 2.0)
        weight[:, 0] = 1.0
        if pad % 2 == 0:
            weight[:, -1] = 1.0
        snr = math.sqrt(float((weight * np.abs(spectrum) ** 2 / psd_box).sum()) / pad**2)
        image = scipy.fft.irfft2(spectrum * (truth.snr / snr), s=(pad, pad)) / dose
        top, left = cy - pad // 2, cx - pad // 2
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + pad, height), min(left + pad, width)
        signal[y0:y1, x0:x1] += image[y0 - top : y1 - top, x0 - left : x1 - left]
    rng = np.random.default_rng(seed)
    # The 1/f background: Gaussian noise shaped to the background part of the PSD.
    shaped = scipy.fft.rfft2(rng.normal(size=shape)) * np.sqrt(
        noise_psd(shape, dose, background) / dose - 1.0
    )
    field = scipy.fft.irfft2(shaped, s=shape)
    expected = dose * (1.0 + signal) + math.sqrt(dose) * field
    return rng.poisson(np.maximum(expected, 0.0)).astype(np.float32)


def place(
    n: int, shape: tuple[int, int], box: int, separation: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """``n`` sub-pixel centres at least ``separation`` apart, boxes inside the micrograph."""
    centres: list[tuple[float, float]] = []
    for _ in range(10_000):
        if len(centres) == n:
            break
        y = rng.uniform(box // 2, shape[0] - box + box // 2)
        x = rng.uniform(box // 2, shape[1] - box + box // 2)
        if all(math.hypot(y - a, x - b) >= separation for a, b in centres):
            centres.append((y, x))
    return centres


def write_set(
    directory: Path,
    *,
    seed: int,
    snrs: tuple[float, ...] = (6.0, 8.0, 10.0, 12.0),
    per_snr: int = 2,
    noise_only: int = 4,
    shape: tuple[int, int] = (512, 512),
    box: int = 64,
    pixel_size: float = 2.0,
    n_particles: int = 8,
) -> dict[str, object]:
    """Write micrographs, one template per shape and ``truth.json`` into ``directory``.

    Each shape gets ``per_snr`` micrographs at every SNR (all its particles at that SNR) and
    ``noise_only`` micrographs without particles. Returns the manifest written to
    ``truth.json``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    optics = {
        "pixel_size": pixel_size,
        "voltage": 300.0,
        "spherical_aberration": 2.7,
        "amplitude_contrast_ratio": 0.07,
        "defocus_u": 8000.0,
        "defocus_v": 7600.0,
        "astigmatism_angle": 25.0,
        "phase_shift": 0.0,
        "b_factor": 0.0,
    }
    manifest: dict[str, object] = {"optics": optics, "box": box, "shapes": {}}
    for index, name in enumerate(SHAPES):
        template = molecule(name, box, pixel_size, seed=seed * 100 + index)
        template_path = directory / f"{name}_template.mrc"
        write_map(template_path, template, pixel_size=pixel_size)
        micrographs = []
        plan = [(snr, k) for snr in snrs for k in range(per_snr)] + [
            (0.0, k) for k in range(noise_only)
        ]
        for snr, k in plan:
            count = n_particles if snr > 0 else 0
            centres = place(count, shape, box, 0.9 * box, rng)
            poses = Rotation.random(len(centres), random_state=rng).as_euler("ZYZ", degrees=True)
            truths = [
                Truth(
                    y,
                    x,
                    float(p[0]) % 360,
                    float(p[1]),
                    float(p[2]) % 360,
                    float(rng.uniform(-150, 150)),
                    snr,
                )
                for (y, x), p in zip(centres, poses, strict=True)
            ]
            image = micrograph(
                template,
                shape,
                truths,
                optics=optics,
                dose=30.0,
                background=2.0,
                seed=int(rng.integers(2**31)),
            )
            label = f"{name}_snr{snr:g}_{k}" if snr > 0 else f"{name}_noise_{k}"
            path = directory / f"{label}.mrc"
            write_map(path, image, pixel_size=pixel_size)
            micrographs.append(
                {
                    "name": label,
                    "path": path.name,
                    "snr": snr,
                    "particles": [asdict(t) for t in truths],
                }
            )
        manifest["shapes"][name] = {
            "template": template_path.name,  # type: ignore[index]
            "micrographs": micrographs,
        }
    (directory / "truth.json").write_text(json.dumps(manifest, indent=1))
    return manifest
