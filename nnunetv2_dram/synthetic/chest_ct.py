"""Synthetic chest CT with lung lobes and COVID-19-like lesions: the project's embedded default data.

One case is drawn from an integer seed and rendered deterministically:

* anatomy (body wall, ribs, spine, mediastinum/heart, two lungs split into five lobes by curved fissures) is a set
  of implicit shapes in *normalised* coordinates (x, y in units of half the in-plane field of view, z in units of
  half the scanned length), bent by a smooth random warp so that every case has lungs of its own shape and size;
* a branching vessel tree grows from each hilum into every lobe (it never crosses a fissure);
* lesions are thresholded smooth noise biased towards the pleura and the dependent (posterior) lung, with a few
  nodular bumps that become small lesions; the threshold is chosen per lobe so that each lobe gets the involvement
  drawn for it (many lobes stay at 0 %); inside a lesion the tissue is ground glass (from faint to dense),
  consolidation or crazy paving, with hazy margins;
* the lung has texture at two scales; the scanner is a Gaussian blur plus correlated noise (15-50 HU) at a per-case
  level, on an anisotropic voxel grid.

Arrays are (z, y, x) as SimpleITK returns them with an identity direction (LPS): patient left is at larger x,
anterior at smaller y, the head at larger z.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

LOBE_LABELS = {"background": 0, "left_upper_lobe": 1, "left_lower_lobe": 2, "right_upper_lobe": 3,
               "right_middle_lobe": 4, "right_lower_lobe": 5}
LUNG_LABELS_2D = {"background": 0, "left_lung": 1, "right_lung": 2}
MODES = ("3d", "2d")

# 2-D cases are slices of a 3-D scan with the default volume's proportions (64 x 160 x 160 voxels)
SCAN_SLICES_PER_ROW = 64 / 160

LEFT_LOBES = (1, 2)
RIGHT_LOBES = (3, 4, 5)
# A "missing" lobe is fused with a neighbour of the same lung (an incomplete fissure the lobe segmenter could not
# find), so its label is absent from the map while the lung itself stays whole.
FUSED_INTO = {1: 2, 2: 1, 3: 4, 4: 3, 5: 4}

# In-plane field of view the anatomy constants below were tuned for; vessel calibres scale with it.
REFERENCE_HALF_FOV_MM = 120.0


@dataclass
class SyntheticCase:
    """One rendered case. `spacing` and `origin` are in (z, y, x) order like the arrays (SimpleITK wants x, y, z)."""
    image: np.ndarray                 # int16 HU, (z, y, x)
    regions: np.ndarray               # uint8 region map (lobes in 3-D, lungs in 2-D)
    lesion: np.ndarray                # uint8 0/1 lesion mask, only inside regions
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    region_labels: dict[str, int]     # the dataset.json "labels" of this mode
    region_percent: dict[int, float]  # lesion voxels / region voxels x 100, for every region present in the map
    mode: str = "3d"
    seed: int = 0
    info: dict = field(default_factory=dict)  # drawn parameters worth knowing (noise, severity, fused lobe, ...)

    def to_sitk(self, array: np.ndarray):
        """`array` (one of image/regions/lesion) as a SimpleITK image with this case's geometry."""
        import SimpleITK as sitk
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in self.origin[::-1]))
        return img


# ---------------------------------------------------------------------------------------------------------------
# Smooth random fields
# ---------------------------------------------------------------------------------------------------------------

def _bspline_taps(samples, start: float, cell: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Knot indices and weights, each (len(samples), 4), of a cubic B-spline on knots start + i*cell."""
    u = (np.asarray(samples, dtype=np.float64) - start) / cell
    i0 = np.floor(u).astype(int)
    t = u - i0
    weights = np.stack([(1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
                        (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6], axis=1)
    return np.clip(i0[:, None] + np.arange(-1, 3), 0, n - 1), weights


def _bspline_matrix(samples, start: float, cell: float, n: int) -> np.ndarray:
    """The same weights as a dense (len(samples), n) matrix."""
    index, weights = _bspline_taps(samples, start, cell, n)
    matrix = np.zeros((len(index), n))
    np.add.at(matrix, (np.arange(len(index))[:, None], index), weights)
    return matrix


class SmoothField:
    """Zero-mean, unit-variance smooth random field: white noise on a coarse knot grid (cell size `cell_mm`)
    interpolated by a cubic B-spline. Evaluated on separable grids (cheap tensor products, so full volumes and
    single slices cost little) or at scattered points; both give the same values."""

    def __init__(self, rng: np.random.Generator, extent_mm, cell_mm):
        self.cell = np.broadcast_to(np.asarray(cell_mm, dtype=float), (3,)).copy()
        half = np.asarray(extent_mm, dtype=float) / 2
        self.start = -half - 2 * self.cell
        self.n = np.ceil(2 * half / self.cell).astype(int) + 5
        self.knots = rng.standard_normal(tuple(self.n))

    def grid(self, z_mm, y_mm, x_mm) -> np.ndarray:
        wz, wy, wx = (_bspline_matrix(a, s, c, n).astype(np.float32) for a, s, c, n in
                      zip((z_mm, y_mm, x_mm), self.start, self.cell, self.n))
        # contract z first: a single slice (2-D mode) then costs almost nothing
        values = np.tensordot(wz, self.knots.astype(np.float32), axes=([1], [0]))  # (Z, ny, nx)
        values = np.tensordot(values, wy, axes=([1], [1]))               # (Z, nx, Y)
        values = np.tensordot(values, wx, axes=([1], [1]))               # (Z, Y, X)
        norm = np.sqrt((wz ** 2).sum(1))[:, None, None] * np.sqrt((wy ** 2).sum(1))[None, :, None] \
            * np.sqrt((wx ** 2).sum(1))[None, None, :]
        return (values / norm).astype(np.float32)

    def points(self, z_mm, y_mm, x_mm) -> np.ndarray:
        (iz, wz), (iy, wy), (ix, wx) = (_bspline_taps(np.ravel(a), s, c, n) for a, s, c, n in
                                        zip((z_mm, y_mm, x_mm), self.start, self.cell, self.n))
        values = np.zeros(len(iz))
        for a in range(4):
            for b in range(4):
                wab = wz[:, a] * wy[:, b]
                for c in range(4):
                    values += wab * wx[:, c] * self.knots[iz[:, a], iy[:, b], ix[:, c]]
        norm = np.sqrt((wz ** 2).sum(1) * (wy ** 2).sum(1) * (wx ** 2).sum(1))
        return (values / norm).reshape(np.shape(z_mm))


# ---------------------------------------------------------------------------------------------------------------
# Geometry of the voxel grid
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """Voxel centres in mm relative to the centre of the (virtual 3-D) scan, and the normalisation scales."""
    shape: tuple[int, int, int]        # rendered array shape
    spacing: tuple[float, float, float]
    z_mm: np.ndarray
    y_mm: np.ndarray
    x_mm: np.ndarray
    half_fov: float                    # mm per normalised in-plane unit
    half_length: float                 # mm per normalised z unit
    extent_mm: tuple[float, float, float]  # of the whole virtual scan (fields are defined over it)

    @classmethod
    def make(cls, shape3d, spacing, z_level_mm: float | None = None) -> "Grid":
        nz, ny, nx = shape3d
        sz, sy, sx = spacing
        axis = lambda n, s: (np.arange(n) - (n - 1) / 2) * s  # noqa: E731
        z_mm = axis(nz, sz) if z_level_mm is None else np.array([z_level_mm])
        return cls(shape=(len(z_mm), ny, nx), spacing=tuple(spacing), z_mm=z_mm, y_mm=axis(ny, sy),
                   x_mm=axis(nx, sx), half_fov=min(ny * sy, nx * sx) / 2, half_length=nz * sz / 2,
                   extent_mm=(nz * sz, ny * sy, nx * sx))

    def normalised(self):
        """Broadcastable (z, y, x) in normalised units."""
        return (self.z_mm[:, None, None] / self.half_length, self.y_mm[None, :, None] / self.half_fov,
                self.x_mm[None, None, :] / self.half_fov)

    @property
    def mm_scale(self) -> np.ndarray:
        """mm per normalised unit along (z, y, x)."""
        return np.array([self.half_length, self.half_fov, self.half_fov])

    @property
    def origin(self) -> tuple[float, float, float]:
        return float(self.z_mm[0]), float(self.y_mm[0]), float(self.x_mm[0])


# ---------------------------------------------------------------------------------------------------------------
# Anatomy: parameters and implicit shapes (normalised coordinates)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Anatomy:
    """Drawn shape and tissue parameters of one case, in normalised units (see the module docstring)."""
    body_a: float            # half-width of the body
    body_front: float        # body extent in front of / behind the centre (the back is flatter)
    body_back: float
    body_power: float        # superellipse exponent of the body outline (2 = ellipse, larger = boxier)
    fat: float               # subcutaneous fat thickness, as a fraction of the body radius
    cav_a: float             # thoracic cavity: half-width, half-depth and centre
    cav_b: float
    cav_cy: float
    mid_x: float             # mediastinum: centre line and half-width of its central band
    mid_w: float
    heart_c: tuple           # heart ellipsoid: centre (x, y, z), radii, and in-plane rotation
    heart_r: tuple
    heart_angle: float
    aorta_x: float           # descending aorta
    aorta_y: float
    aorta_r: float
    spine_y: float           # vertebral body centre, radius, and vertebra height (z)
    spine_r: float
    vertebra_pitch: float
    lung_x: float            # lateral distance of each lung's centre from the midline
    apex: dict               # per side ("L"/"R"): z of the apex and of the diaphragm dome
    dome: dict
    oblique: dict            # per side: oblique fissure (z0, slope, curvature, lateral tilt, lateral bend)
    horizontal: tuple        # right horizontal fissure (z0, tilt)
    rib_pitch: float
    rib_phase: float
    rib_drop: float          # how far a rib descends from the spine to the front
    rib_half: float          # half-height of a rib (z)
    rib_depth: float         # radial thickness of a rib
    fused_lobe: int | None   # lobe fused into its neighbour (label absent from the map), or None
    hu: dict                 # tissue HU
    warp: list               # three SmoothFields: displacement along z, y, x
    warp_amplitude: float


def draw_anatomy(rng: np.random.Generator, extent_mm, fused_lobe_probability: float = 0.12,
                 fused_lobe: int | None = None) -> Anatomy:
    """All anatomical parameters of one case, drawn from `rng` (always the same number of draws)."""
    u = rng.uniform
    body_a, body_front, body_back = u(0.84, 0.95), u(0.60, 0.72), u(0.60, 0.70)
    cav_a = body_a - u(0.10, 0.16)
    cav_front, cav_back = -body_front + u(0.07, 0.13), body_back - u(0.20, 0.26)
    fuse_draw, fuse_which = rng.random(), int(rng.integers(1, 6))
    if fused_lobe is None and fuse_draw < fused_lobe_probability:
        fused_lobe = fuse_which
    mid_x = u(-0.02, 0.06)
    apex_r = u(0.68, 0.86)
    dome_r = u(-0.45, -0.25)
    return Anatomy(
        body_a=body_a, body_front=body_front, body_back=body_back, body_power=u(2.0, 2.4), fat=u(0.025, 0.09),
        cav_a=cav_a, cav_b=(cav_back - cav_front) / 2, cav_cy=(cav_back + cav_front) / 2,
        mid_x=mid_x, mid_w=u(0.07, 0.12),
        heart_c=(mid_x + u(0.14, 0.22), u(-0.30, -0.20), u(-0.60, -0.40)),
        heart_r=(u(0.32, 0.40), u(0.19, 0.25), u(0.36, 0.48)), heart_angle=u(0.45, 0.8),
        aorta_x=u(0.07, 0.13), aorta_y=cav_back - u(0.20, 0.25), aorta_r=u(0.06, 0.08),
        spine_y=cav_back - u(0.06, 0.09), spine_r=u(0.10, 0.13), vertebra_pitch=u(0.26, 0.32),
        lung_x=u(0.40, 0.46),
        apex={"L": apex_r - u(-0.04, 0.06), "R": apex_r},
        dome={"L": dome_r - u(0.03, 0.12), "R": dome_r},
        oblique={side: (u(-0.20, 0.00), u(0.95, 1.30), u(0.1, 0.6), u(0.2, 0.8), u(-1.5, 1.5)) for side in "LR"},
        horizontal=(u(-0.25, -0.02), u(-0.15, 0.15)),
        rib_pitch=u(0.19, 0.24), rib_phase=u(0, 1), rib_drop=u(0.7, 1.0), rib_half=u(0.03, 0.04),
        rib_depth=u(0.05, 0.07),
        fused_lobe=fused_lobe,
        hu={"fat": u(-115, -85), "muscle": u(35, 60), "blood": u(30, 50), "liver": u(50, 70),
            "lung": u(-880, -820), "lung_gradient": u(15, 45), "bone": u(550, 900), "marrow": u(180, 320)},
        warp=[SmoothField(rng, extent_mm, cell_mm=np.asarray(extent_mm) / 2.5) for _ in range(3)],
        warp_amplitude=u(0.03, 0.06),
    )


def warp_grid(anat: Anatomy, grid: Grid):
    """Warped normalised coordinates of every voxel (each a full array)."""
    z, y, x = grid.normalised()
    dz, dy, dx = (f.grid(grid.z_mm, grid.y_mm, grid.x_mm) * anat.warp_amplitude for f in anat.warp)
    return (z + dz).astype(np.float32), (y + dy).astype(np.float32), (x + dx).astype(np.float32)


def warp_points(anat: Anatomy, grid: Grid, points_mm: np.ndarray):
    """Warped normalised coordinates of scattered points given in mm, shape (n, 3) in (z, y, x)."""
    z, y, x = points_mm.T
    d = [f.points(z, y, x) * anat.warp_amplitude for f in anat.warp]
    scale = grid.mm_scale
    return z / scale[0] + d[0], y / scale[1] + d[1], x / scale[2] + d[2]


def body_radius(anat: Anatomy, y, x):
    """1 on the skin, 0 at the centre: a superellipse, deeper in front than behind."""
    depth = np.where(y < 0, anat.body_front, anat.body_back)
    p = anat.body_power
    return (np.abs(x / anat.body_a) ** p + np.abs(y / depth) ** p) ** (1.0 / p)


def heart_r2(anat: Anatomy, z, y, x):
    """Squared ellipsoid radius of the heart, whose long axis points to the left and to the front."""
    (cx, cy, cz), (rx, ry, rz) = anat.heart_c, anat.heart_r
    c, s = np.cos(anat.heart_angle), np.sin(anat.heart_angle)
    along, across = c * (x - cx) - s * (y - cy), s * (x - cx) + c * (y - cy)
    return (along / rx) ** 2 + (across / ry) ** 2 + ((z - cz) / rz) ** 2


def _cavity_r2(anat, z, y, x):
    """Squared radius of the thoracic cavity: an ellipse per slice that narrows towards the thoracic inlet."""
    taper = 1.0 - 0.22 * np.clip(z - 0.1, 0, None) ** 1.5
    return (x / (anat.cav_a * taper)) ** 2 + ((y - anat.cav_cy) / (anat.cav_b * taper)) ** 2


def mediastinum_mask(anat: Anatomy, z, y, x):
    """Soft tissue between the lungs: a central band, the heart, the descending aorta and the spine."""
    # narrow in front (the lungs almost meet behind the sternum), wider at the back and higher up
    front_to_back = np.clip((y - anat.cav_cy) / anat.cav_b + 0.6, 0, 1.2)
    band = np.abs(x - anat.mid_x) < anat.mid_w * (0.6 + 0.6 * front_to_back + 0.35 * np.clip(z - 0.2, 0, 1))
    heart = heart_r2(anat, z, y, x) < 1
    aorta = (x - anat.aorta_x) ** 2 + (y - anat.aorta_y) ** 2 < (anat.aorta_r + 0.02) ** 2
    spine = x ** 2 + (y - anat.spine_y) ** 2 < (anat.spine_r + 0.03) ** 2
    return band | heart | aorta | spine


def lung_envelope(anat: Anatomy, y, x):
    """z of the lung apex (top) and of the diaphragm (bottom) above each (y, x): domes, lowest at the back."""
    left = x > anat.mid_x
    lateral = np.abs(x - anat.mid_x)
    yl = y - anat.cav_cy
    apex = np.where(left, anat.apex["L"], anat.apex["R"])
    dome = np.where(left, anat.dome["L"], anat.dome["R"])
    spread = ((lateral - anat.lung_x) / 0.45) ** 2 + ((yl - 0.05) / 0.5) ** 2
    top = apex - 0.8 * spread
    bottom = dome - 0.45 * spread - 0.35 * np.clip(yl - 0.05, 0, None)
    return top, bottom


def lobe_labels(anat: Anatomy, z, y, x) -> np.ndarray:
    """Lobe label (1..5, 0 outside the lungs) at warped normalised coordinates, before any lobe fusion."""
    z, y, x = np.broadcast_arrays(z, y, x)
    left = x > anat.mid_x
    lateral = np.abs(x - anat.mid_x)
    yl = y - anat.cav_cy
    top, bottom = lung_envelope(anat, y, x)
    lung = (_cavity_r2(anat, z, y, x) < 1) & (z < top) & (z > bottom) & ~mediastinum_mask(anat, z, y, x)

    def oblique(side):
        z0, slope, curve, tilt, bend = anat.oblique[side]
        off = lateral - anat.lung_x
        return z0 + slope * yl + curve * yl ** 2 + tilt * off + bend * off ** 2

    labels = np.zeros(z.shape, dtype=np.uint8)
    lower_left = z < oblique("L")
    labels[lung & left] = np.where(lower_left, 2, 1)[lung & left]
    h0, h_tilt = anat.horizontal
    right = lung & ~left
    lower_right = z < oblique("R")
    middle = ~lower_right & (z < h0 + h_tilt * yl + 0.1 * (lateral - anat.lung_x))
    labels[right] = np.where(lower_right, 5, np.where(middle, 4, 3))[right]
    return labels


def fuse_lobe(anat: Anatomy, labels: np.ndarray) -> np.ndarray:
    if anat.fused_lobe is not None:
        labels = np.where(labels == anat.fused_lobe, np.uint8(FUSED_INTO[anat.fused_lobe]), labels)
    return labels


def render_body(anat: Anatomy, z, y, x, texture: np.ndarray) -> np.ndarray:
    """HU of everything except lung parenchyma: air, fat, muscle, mediastinum, heart, aorta, abdomen, bones."""
    hu = anat.hu
    image = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), -1000.0, dtype=np.float32)
    body_r = body_radius(anat, y, x)
    body = body_r < 1
    image[body] = hu["fat"]
    # muscle under the fat, with fat streaks between muscle bellies
    muscle = body & (body_r < 1 - anat.fat) & (texture > -0.8)
    image[muscle] = hu["muscle"]
    cavity = _cavity_r2(anat, z, y, x) < 1
    # mediastinal fat with soft-tissue vessels/nodes in it, abdomen below the diaphragm
    image[cavity] = np.where(texture > 0.3, hu["blood"], hu["fat"] + 20)[cavity]
    heart = heart_r2(anat, z, y, x)
    image[(heart < 1.15) & cavity] = hu["fat"]          # pericardial fat
    image[heart < 1] = hu["blood"]
    aorta = (x - anat.aorta_x) ** 2 + (y - anat.aorta_y) ** 2 < anat.aorta_r ** 2
    image[aorta & cavity] = hu["blood"] + 5
    abdomen = cavity & (z < lung_envelope(anat, y, x)[1]) & ~(heart < 1.15)
    image[abdomen] = np.where(x < anat.mid_x + 0.1, hu["liver"], hu["muscle"] - 5)[abdomen]
    render_bones(anat, z, y, x, image)
    return image


def render_bones(anat: Anatomy, z, y, x, image: np.ndarray) -> None:
    """Vertebrae, ribs and sternum, painted over `image`."""
    hu = anat.hu
    # vertebral bodies (cortical rim, marrow inside, discs between them), canal and spinous process behind
    spine_d = np.sqrt(x ** 2 + (y - anat.spine_y) ** 2)
    disc = (np.mod(z / anat.vertebra_pitch + 0.5, 1.0) < 0.18)
    vertebra = spine_d < anat.spine_r
    image[vertebra] = np.where(disc, 85.0, np.where(spine_d > anat.spine_r - 0.018, hu["bone"], hu["marrow"]))[vertebra]
    canal_y = anat.spine_y + anat.spine_r + 0.06
    canal_d = np.sqrt(x ** 2 + (y - canal_y) ** 2)
    arch = (canal_d < 0.085) | ((np.abs(x) < 0.022) & (y > canal_y) & (y < canal_y + 0.16))
    arch |= (np.abs(y - canal_y + 0.01) < 0.022) & (np.abs(x) < 0.2) & (np.abs(x) > 0.05)  # transverse processes
    image[arch & ~disc] = hu["bone"] * 0.8
    image[canal_d < 0.055] = 15.0
    # ribs: a ring just outside the cavity; each rib leaves the spine and slopes down towards the front
    r = np.sqrt(_cavity_r2(anat, z, y, x))
    ring = (r > 1.0) & (r < 1.0 + anat.rib_depth / anat.cav_a)
    around = np.arctan2(np.abs(x), y - anat.cav_cy) / np.pi  # 0 at the back, 1 at the front
    unrolled = z + anat.rib_drop * around ** 1.4
    phase = np.mod(unrolled / anat.rib_pitch + anat.rib_phase, 1.0)
    rib = ring & (np.abs(phase - 0.5) < anat.rib_half / anat.rib_pitch) & (around > 0.1) & (around < 0.82)
    core = np.abs(phase - 0.5) < 0.5 * anat.rib_half / anat.rib_pitch
    image[rib] = np.where(core, hu["marrow"] + 80, hu["bone"])[rib]
    # sternum in front
    sternum = ((x / 0.09) ** 2 + ((y - (anat.cav_cy - anat.cav_b - 0.035)) / 0.03) ** 2 < 1) & (z > -0.6)
    image[sternum] = hu["bone"] * 0.7


def render_airways(anat: Anatomy, grid: Grid, image: np.ndarray) -> None:
    """Trachea and main bronchi: air tubes with a soft-tissue wall, from the top of the scan to each hilum."""
    s = grid.mm_scale
    carina = np.array([0.15, anat.cav_cy + 0.08, anat.mid_x]) * s
    top = np.array([1.2, anat.cav_cy + 0.04, anat.mid_x]) * s
    hila = [np.array([0.0, anat.cav_cy + 0.1, anat.mid_x + side * (anat.mid_w + 0.08)]) * s for side in (-1, 1)]
    scale = grid.half_fov / REFERENCE_HALF_FOV_MM
    radius = 8.0 * scale
    segments = [(top, carina, radius, radius)] + [(carina, h, radius * 0.75, radius * 0.6) for h in hila]
    wall = np.zeros(grid.shape, np.float32)
    lumen = np.zeros(grid.shape, np.float32)
    for a, b, ra, rb in segments:
        rasterize_tube(wall, grid, a, b, ra + 1.5 * scale, rb + 1.5 * scale)
        rasterize_tube(lumen, grid, a, b, ra, rb)
    image += wall * (anat.hu["muscle"] - image)
    image += lumen * (-1000.0 - image)


# ---------------------------------------------------------------------------------------------------------------
# Vessels
# ---------------------------------------------------------------------------------------------------------------

def rasterize_tube(occupancy: np.ndarray, grid: Grid, a, b, ra: float, rb: float) -> None:
    """occupancy = max(occupancy, anti-aliased inside of the tapered tube a->b); a, b in mm (z, y, x)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    r = max(ra, rb)
    axes = (grid.z_mm, grid.y_mm, grid.x_mm)
    box = []
    for k, ax in enumerate(axes):
        lo, hi = min(a[k], b[k]) - r - grid.spacing[k], max(a[k], b[k]) + r + grid.spacing[k]
        i0, i1 = np.searchsorted(ax, lo), np.searchsorted(ax, hi)
        if i1 <= i0:
            return
        box.append(slice(i0, i1))
    pz, py, px = (ax[sl].reshape(shape) for ax, sl, shape in
                  zip(axes, box, ((-1, 1, 1), (1, -1, 1), (1, 1, -1))))
    ab = b - a
    length2 = max(float(ab @ ab), 1e-9)
    t = np.clip(((pz - a[0]) * ab[0] + (py - a[1]) * ab[1] + (px - a[2]) * ab[2]) / length2, 0, 1)
    d = np.sqrt((pz - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (px - a[2] - t * ab[2]) ** 2)
    edge = min(grid.spacing[1:])
    inside = np.clip((ra + (rb - ra) * t - d) / edge + 0.5, 0, 1)
    np.maximum(occupancy[tuple(box)], inside, out=occupancy[tuple(box)])


def _perpendicular(d: np.ndarray, rng) -> np.ndarray:
    """Random unit vectors perpendicular to the rows of d."""
    v = rng.standard_normal(d.shape)
    v -= (v * d).sum(1, keepdims=True) * d
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sample_lobe_points(anat: Anatomy, grid: Grid, rng, n: int = 6000) -> tuple[np.ndarray, np.ndarray]:
    """Random points (mm, (n, 3)) over the scan and their lobe labels (0 outside the lungs)."""
    half = np.asarray(grid.extent_mm) / 2
    points = rng.uniform(-half, half, size=(n, 3))
    return points, lobe_labels(anat, *warp_points(anat, grid, points))


def grow_vessel_tree(anat: Anatomy, grid: Grid, rng, max_generations: int = 9):
    """Segments (a_mm, b_mm, r_a, r_b) of the pulmonary vessel trees.

    From each hilum a few trunks head into every lobe. Each branch then forks in two: a main child that keeps
    roughly its course and a thinner side branch, both aimed at random points of the same lobe ahead of it (so the
    tree fills the lobe and never crosses a fissure). Growth stops when a branch gets thin or leaves its lobe."""
    scale = grid.half_fov / REFERENCE_HALF_FOV_MM
    points, labels = sample_lobe_points(anat, grid, rng, n=12000)
    lobe_points = {lobe: points[labels == lobe] for lobe in range(1, 6)}
    mm = grid.mm_scale
    starts, dirs, lengths, radii, lobes = [], [], [], [], []
    for lobe, inside in lobe_points.items():
        if len(inside) < 3:
            continue
        side = 1 if lobe in LEFT_LOBES else -1
        hilum = np.array([0.0, anat.cav_cy + 0.1, anat.mid_x + side * (anat.mid_w + 0.06)]) * mm
        for target in inside[rng.choice(len(inside), size=min(3, len(inside)), replace=False)]:
            d = target - hilum
            dist = np.linalg.norm(d)
            starts.append(hilum); dirs.append(d / dist); lobes.append(lobe)  # noqa: E702
            lengths.append(0.3 * dist); radii.append(rng.uniform(2.5, 3.5) * scale)  # noqa: E702
    if not starts:
        return []
    starts, dirs, lengths, radii, lobes = map(np.array, (starts, dirs, lengths, radii, lobes))
    segments = []
    min_radius = 0.4 * scale
    for generation in range(max_generations):
        ends = starts + dirs * lengths[:, None]
        keep = lobe_labels(anat, *warp_points(anat, grid, ends)) == lobes
        if generation > 0:
            mids = starts + dirs * (0.5 * lengths[:, None])
            keep &= lobe_labels(anat, *warp_points(anat, grid, mids)) == lobes
        else:
            keep |= True  # trunks start in the mediastinum
        # each branch is drawn as two pieces with a slight kink, so that vessels do not look like rods
        kinks = starts + dirs * (0.5 * lengths[:, None]) \
            + _perpendicular(dirs, rng) * (rng.uniform(0.05, 0.15, len(starts)) * lengths)[:, None]
        for a, m, b, r, ok in zip(starts, kinks, ends, radii, keep):
            if ok:
                segments += [(a, m, r, 0.96 * r), (m, b, 0.96 * r, 0.92 * r)]
        grow = keep & (radii * 0.6 > min_radius)
        if not grow.any():
            break
        s, d, L, r, lb = ends[grow], dirs[grow], lengths[grow], radii[grow], lobes[grow]
        new = {k: [] for k in ("starts", "dirs", "lengths", "radii", "lobes")}
        for lobe in np.unique(lb):
            sel = lb == lobe
            for cone, calibre in (((0.75, 1.0), (0.78, 0.9)), ((0.1, 0.75), (0.55, 0.72))):
                child_dirs, reach = _aim_children(s[sel], d[sel], L[sel], lobe_points[int(lobe)], cone, rng)
                n = int(sel.sum())
                new["starts"].append(s[sel])
                new["dirs"].append(child_dirs)
                new["lengths"].append(np.minimum(L[sel] * rng.uniform(0.7, 0.9, n), 0.8 * reach))
                new["radii"].append(r[sel] * rng.uniform(*calibre, n))
                new["lobes"].append(lb[sel])
        starts, dirs, lengths, radii, lobes = (np.concatenate(new[k]) for k in
                                               ("starts", "dirs", "lengths", "radii", "lobes"))
    return segments


def _aim_children(ends, dirs, lengths, lobe_points, cone, rng):
    """For each branch end, a unit direction towards a random point of its lobe whose angle to the branch has a
    cosine within `cone` (a random turn when there is none), and the distance to that point."""
    n = len(ends)
    fallback_angle = np.arccos(np.clip(rng.uniform(*cone, n), -1, 1))[:, None]
    fallback = np.cos(fallback_angle) * dirs + np.sin(fallback_angle) * _perpendicular(dirs, rng)
    keys = rng.random((n, max(len(lobe_points), 1)))
    if len(lobe_points) == 0:
        return fallback, 3 * lengths
    v = lobe_points[None, :, :] - ends[:, None, :]
    dist = np.linalg.norm(v, axis=2) + 1e-9
    cos = (v * dirs[:, None, :]).sum(2) / dist
    usable = (cos >= cone[0]) & (cos <= cone[1]) & (dist < 4 * lengths[:, None]) & (dist > 0.5 * lengths[:, None])
    keys[~usable] = -1
    pick = keys.argmax(1)
    rows = np.arange(n)
    found = keys[rows, pick] >= 0
    aimed = v[rows, pick] / dist[rows, pick][:, None]
    out = np.where(found[:, None], aimed, fallback)
    reach = np.where(found, dist[rows, pick], 3 * lengths)
    return out / np.linalg.norm(out, axis=1, keepdims=True), reach


def render_vessels(segments, grid: Grid) -> np.ndarray:
    occupancy = np.zeros(grid.shape, np.float32)
    for a, b, ra, rb in segments:
        rasterize_tube(occupancy, grid, a, b, ra, rb)
    return occupancy


# ---------------------------------------------------------------------------------------------------------------
# Lungs and lesions
# ---------------------------------------------------------------------------------------------------------------

def render_parenchyma(anat: Anatomy, y, regions: np.ndarray, texture: np.ndarray, image: np.ndarray,
                      fine_texture: np.ndarray | float = 0.0) -> None:
    """Aerated lung with a dependent (posterior) density gradient, texture at two scales (the fine one, a few
    millimetres, stands for secondary lobules and small vessels below the resolution) and visible fissures."""
    lung = regions > 0
    parenchyma = (anat.hu["lung"] + anat.hu["lung_gradient"] * (y - anat.cav_cy) / anat.cav_b + 12 * texture
                  + 20 * fine_texture)
    image[lung] = np.broadcast_to(parenchyma, image.shape)[lung]
    # fissures: a thin denser sheet where the lobe changes (weaker across slices: thick slices smear it)
    sheet = np.zeros(image.shape, np.float32)
    for axis, weight in ((0, 0.25), (1, 0.8), (2, 0.8)):
        if regions.shape[axis] < 2:
            continue
        a = np.take(regions, range(1, regions.shape[axis]), axis=axis)
        b = np.take(regions, range(0, regions.shape[axis] - 1), axis=axis)
        boundary = (a != b) & (a > 0) & (b > 0)
        index = [slice(None)] * 3
        index[axis] = slice(1, None)
        np.maximum(sheet[tuple(index)], weight * boundary, out=sheet[tuple(index)])
    image += sheet * 220.0


SEVERITIES = {"none": 0.08, "mild": 0.32, "moderate": 0.35, "severe": 0.25}  # how often a case is ...
INVOLVED = {"none": 0.0, "mild": 0.45, "moderate": 0.70, "severe": 0.90}    # ... and how often its regions are hit
# smallest lesion share kept: the lower bound of CTSS 1 (anything less would also read 0.0 % at the 0.1 % rounding of
# targets)
MIN_PERCENT = 0.1


def draw_lesion_targets(rng, labels_present, mode: str) -> tuple[str, dict[int, float]]:
    """Case severity and the fraction of each region to involve (many regions stay at 0)."""
    names = list(SEVERITIES)
    severity = names[rng.choice(len(names), p=list(SEVERITIES.values()))]
    log_uniform = lambda low, high: float(np.exp(rng.uniform(np.log(low), np.log(high))))  # noqa: E731
    targets = {}
    for label in labels_present:
        p = INVOLVED[severity]
        if mode == "3d" and p > 0:
            p += {2: 0.1, 5: 0.1, 4: -0.1}.get(label, 0.0)  # lower lobes more often, the middle lobe less
        hit, confluent = rng.random() < p, rng.random() < 0.55
        if not hit:
            targets[label] = 0.0
        elif severity == "mild":
            targets[label] = log_uniform(0.004, 0.10)
        elif severity == "moderate":
            targets[label] = log_uniform(0.02, 0.45)
        else:
            targets[label] = float(rng.uniform(0.40, 0.90)) if confluent else log_uniform(0.05, 0.50)
    return severity, targets


def lesion_score(anat: Anatomy, regions: np.ndarray, y, fields: dict, spacing, rng) -> np.ndarray:
    """Where lesions appear first: multi-scale smooth noise plus subpleural and dependent (posterior) bias, and a
    few nodular bumps, so that mildly involved lobes get small lesions of a few millimetres as well as patches."""
    lung = (regions > 0).astype(np.float32)
    sigma = [0.0 if n < 2 else 9.0 / s for n, s in zip(lung.shape, spacing)]
    depth = ndimage.gaussian_filter(lung, sigma=sigma, mode="constant")   # ~0.5 at the pleura, ~1 deep inside
    peripheral = rng.uniform(2.0, 4.5)
    posterior = rng.uniform(0.3, 1.4)
    score = (fields["patches"] + 0.5 * fields["detail"] + peripheral * (1.0 - depth)
             + posterior * (y - anat.cav_cy) / anat.cav_b).astype(np.float32)
    add_nodules(score, regions > 0, spacing, rng)
    return score


def add_nodules(score: np.ndarray, lung: np.ndarray, spacing, rng, mean_count: float = 5.0) -> None:
    """Gaussian bumps (sigma 2-5 mm) at random lung voxels, in place: where the score's threshold cuts them they
    become small round lesions."""
    inside = np.argwhere(lung)
    if len(inside) == 0:
        return
    for _ in range(int(rng.poisson(mean_count))):
        centre = inside[rng.integers(len(inside))]
        sigma_mm = rng.uniform(2.0, 5.0)
        height = rng.uniform(2.5, 4.5)
        reach = [int(np.ceil(3 * sigma_mm / s)) for s in spacing]
        box = tuple(slice(max(0, c - r), min(n, c + r + 1)) for c, r, n in zip(centre, reach, score.shape))
        offsets = np.ogrid[box]
        squared = sum(((o - c) * s) ** 2 for o, c, s in zip(offsets, centre, spacing))
        score[box] += (height * np.exp(-0.5 * squared / sigma_mm ** 2)).astype(np.float32)


def place_lesions(regions: np.ndarray, score: np.ndarray, targets: dict[int, float]):
    """Per region, the top `target` fraction of the score becomes lesion. Returns the mask and, per voxel,
    how far above its region's threshold it lies (used to shade edges and place consolidation)."""
    lesion = np.zeros(regions.shape, bool)
    excess = np.full(regions.shape, -np.inf, np.float32)
    for label, fraction in targets.items():
        inside = regions == label
        values = score[inside]
        if fraction <= 0 or values.size == 0:
            continue
        threshold = np.quantile(values, 1.0 - fraction)
        if (values > threshold).sum() < MIN_PERCENT / 100 * values.size:
            continue
        excess[inside] = values - threshold
        lesion[inside] = values > threshold
    return lesion, excess


def render_lesions(image, lesion, excess, fields, y, anat, rng) -> dict:
    """Ground glass (vessels stay visible), consolidation in the lesion cores, crazy paving patches."""
    ggo_hu = rng.uniform(-750, -450)  # from faint ground glass, barely denser than lung, to dense
    cons_hu = rng.uniform(-100, 40)
    cons_share = rng.choice([0.0, rng.uniform(0.05, 0.2), rng.uniform(0.2, 0.5)], p=[0.35, 0.4, 0.25])
    paving_share = rng.choice([0.0, rng.uniform(0.2, 0.6)], p=[0.5, 0.5])
    info = {"ggo_hu": round(float(ggo_hu)), "consolidation_share": round(float(cons_share), 2),
            "crazy_paving_share": round(float(paving_share), 2)}
    if not lesion.any():
        return info
    e = np.where(lesion, excess, 0).astype(np.float32)
    # the lesion edge fades in over a range of the score, so margins are hazy while the mask edge stays visible;
    # cores are denser than margins
    weight = np.clip(0.45 + e / 0.6, 0, 1)
    target = ggo_hu + 70 * fields["detail"] + 120 * np.clip(e / 1.5, 0, 1)
    if cons_share > 0:
        dependent = e + 0.4 * (y - anat.cav_cy) / anat.cav_b
        cut = np.quantile(dependent[lesion], 1 - cons_share)
        cons = np.clip((dependent - cut) / 0.15, 0, 1) * lesion
        target = target + cons * (cons_hu - target)
    else:
        cons = np.zeros_like(e)
    if paving_share > 0:
        patch = fields["paving"]
        cut = np.quantile(patch[lesion], 1 - paving_share)
        reticular = np.exp(-(fields["septa"] / 0.22) ** 2)
        target = target + (patch > cut) * (1 - cons) * reticular * rng.uniform(180, 300)
    image[lesion] = (image + weight * (target - image))[lesion]
    return info


# ---------------------------------------------------------------------------------------------------------------
# Scanner
# ---------------------------------------------------------------------------------------------------------------

def apply_scanner(image: np.ndarray, spacing, rng) -> tuple[np.ndarray, dict]:
    """Point-spread blur and correlated noise at a per-case level; HU are then rounded to int16."""
    noise_hu = rng.uniform(15, 50)  # standard to low-dose chest CT
    blur_mm = rng.uniform(0.5, 1.1)
    sigma_mm = (0.3 * spacing[0], blur_mm, blur_mm)  # across slices: part of the slice sensitivity profile
    sigma = [0.0 if n < 2 else sm / sp for n, sm, sp in zip(image.shape, sigma_mm, spacing)]
    blurred = ndimage.gaussian_filter(image, sigma=sigma)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    # reconstruction kernels correlate noise in-plane; thick slices are reconstructed independently
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.6, 0.6))
    noise *= noise_hu / max(float(noise.std()), 1e-6)
    out = np.clip(np.rint(blurred + noise), -1024, 3071).astype(np.int16)
    return out, {"noise_hu": round(float(noise_hu), 1), "blur_mm": round(float(blur_mm), 2)}


# ---------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------

def draw_spacing(rng) -> tuple[float, float, float]:
    in_plane = round(float(rng.uniform(1.2, 1.8)), 3)
    return round(float(rng.uniform(2.0, 3.0)), 3), in_plane, in_plane


def region_percentages(regions: np.ndarray, lesion: np.ndarray) -> dict[int, float]:
    """lesion voxels / region voxels x 100 for every region label present in the map."""
    counts = np.bincount(regions.ravel(), minlength=256)
    hits = np.bincount(regions.ravel(), weights=lesion.ravel().astype(np.float64), minlength=256)
    return {int(k): float(100.0 * hits[k] / counts[k]) for k in np.nonzero(counts)[0] if k > 0}


def scan_slices_for_2d(ny: int, nx: int) -> int:
    """Slices of the virtual 3-D scan a 2-D case is cut from: the default volume's 64 slices per 160 rows."""
    return max(4, round(SCAN_SLICES_PER_ROW * min(ny, nx)))


def generate_case(seed: int, shape=(64, 160, 160), mode: str = "3d", spacing=None,
                  fused_lobe_probability: float = 0.12, fused_lobe: int | None = None) -> SyntheticCase:
    """Draw and render one synthetic chest CT.

    shape: (z, y, x) of the 3-D scan. In "2d" mode one axial slice of y x x voxels is rendered, with regions left
    lung = 1, right lung = 2 and result shape (1, y, x); z is ignored there (a 2-tuple (y, x) is accepted too): the
    slice is cut from a scan of `scan_slices_for_2d(y, x)` slices, the proportions of the default 64 x 160 x 160
    volume, so that anatomy, vessels and lesions have the same 3-D shape whatever z was given.
    spacing: (z, y, x) mm, drawn per case when None (z 2.0-3.0 mm, in-plane 1.2-1.8 mm).
    fused_lobe: force a lobe (1..5) to be fused into its neighbour; otherwise that happens with
    `fused_lobe_probability` (its label is then absent from the region map).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    shape = tuple(int(s) for s in shape)
    if mode == "2d" and len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3 or min(shape) < 1 or min(shape[1:]) < 16:
        raise ValueError(f"shape must be (z, y, x) with y, x >= 16, got {shape}")
    if mode == "2d":
        # a scan one slice long would squeeze the whole chest, its vessel trees and lesions into that slice
        shape = (scan_slices_for_2d(*shape[1:]),) + shape[1:]
    if mode == "3d" and shape[0] < 4:
        raise ValueError(f"a 3-D case needs at least 4 slices, got shape {shape}")
    if fused_lobe is not None and fused_lobe not in FUSED_INTO:
        raise ValueError(f"fused_lobe must be one of {sorted(FUSED_INTO)} or None, got {fused_lobe!r}")
    rng_anatomy, rng_vessels, rng_lesions, rng_scanner = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4))
    spacing = draw_spacing(rng_anatomy) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")

    full = Grid.make(shape, spacing)
    # lobes only exist in 3-D; in 2-D the regions are whole lungs, so no lobe is fused there
    anat = draw_anatomy(rng_anatomy, full.extent_mm, fused_lobe_probability if mode == "3d" else 0.0,
                        fused_lobe if mode == "3d" else None)
    grid = full if mode == "3d" else Grid.make(shape, spacing, z_level_mm=_draw_slice_level(anat, full, rng_anatomy))

    z, y, x = warp_grid(anat, grid)
    axes = (grid.z_mm, grid.y_mm, grid.x_mm)
    extent = full.extent_mm
    scale = grid.half_fov / REFERENCE_HALF_FOV_MM
    fields = {name: SmoothField(rng_lesions, extent, cell * scale).grid(*axes)
              for name, cell in (("texture", 8.0), ("patches", 18.0), ("detail", 7.0), ("paving", 20.0),
                                 ("septa", 5.0), ("fine", 3.0))}

    lobes = fuse_lobe(anat, lobe_labels(anat, z, y, x))
    image = render_body(anat, z, y, x, fields["texture"])
    render_parenchyma(anat, y, lobes, fields["texture"], image, fields["fine"])
    if mode == "3d":
        regions, region_labels = lobes, LOBE_LABELS
    else:
        regions = np.where(np.isin(lobes, LEFT_LOBES), 1, np.where(lobes > 0, 2, 0)).astype(np.uint8)
        region_labels = LUNG_LABELS_2D

    present = [int(k) for k in np.unique(regions) if k > 0]
    severity, targets = draw_lesion_targets(rng_lesions, present, mode)
    score = lesion_score(anat, regions, y, fields, spacing, rng_lesions)
    lesion, excess = place_lesions(regions, score, targets)
    lesion_info = render_lesions(image, lesion, excess, fields, y, anat, rng_lesions)

    vessels = render_vessels(grow_vessel_tree(anat, grid, rng_vessels), grid)
    soft_tissue_or_lung = (regions > 0) | mediastinum_mask(anat, z, y, x)
    vessel_hu = anat.hu["blood"]
    brighter = soft_tissue_or_lung & (vessels > 0) & (image < vessel_hu)
    image[brighter] += (vessels * (vessel_hu - image))[brighter]
    render_airways(anat, grid, image)

    image, scanner_info = apply_scanner(image, spacing, rng_scanner)
    lesion_u8 = lesion.astype(np.uint8)
    percent = region_percentages(regions, lesion_u8)
    info = {"severity": severity, "targets": {k: round(v * 100, 2) for k, v in targets.items()},
            "fused_lobe": anat.fused_lobe, **lesion_info, **scanner_info}
    return SyntheticCase(image=image, regions=regions, lesion=lesion_u8, spacing=tuple(spacing),
                         origin=grid.origin, region_labels=dict(region_labels), region_percent=percent,
                         mode=mode, seed=int(seed), info=info)


def _draw_slice_level(anat: Anatomy, grid: Grid, rng, tries: int = 20) -> float:
    """z (mm) of an axial slice that cuts both lungs well, anywhere from near the apex to near the bases."""
    low = max(anat.dome.values()) - 0.05
    high = min(anat.apex.values()) - 0.25
    ny, nx = grid.shape[1:]
    yy = grid.y_mm[::max(1, ny // 48)]
    xx = grid.x_mm[::max(1, nx // 48)]
    best, best_count = None, -1
    for _ in range(tries):
        level = float(rng.uniform(low, high)) * grid.half_length
        probe = Grid(shape=(1, len(yy), len(xx)), spacing=grid.spacing, z_mm=np.array([level]), y_mm=yy, x_mm=xx,
                     half_fov=grid.half_fov, half_length=grid.half_length, extent_mm=grid.extent_mm)
        labels = lobe_labels(anat, *warp_grid(anat, probe))
        count = min(np.isin(labels, LEFT_LOBES).sum(), np.isin(labels, RIGHT_LOBES).sum())
        if count > 0.04 * labels.size:
            return level
        if count > best_count:
            best, best_count = level, count
    return best
