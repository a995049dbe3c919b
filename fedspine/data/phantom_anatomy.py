"""Drawing phantom lumbar spine radiographs: anatomy, lesions and X-ray image formation.

The image is built the way a radiograph is: a map of line-integral attenuation (soft tissue,
bowel gas, bone, metal) becomes detector counts with quantum noise, then the log signal goes
through the usual processing chain (dynamic-range compression, edge enhancement, contrast curve).
That gives the right look for free: bone bright on MONOCHROME2, cortical rims brighter where the
beam runs along them, more noise behind dense anatomy.

Geometry is sampled in millimetres (:class:`Anatomy`, :class:`Lesion`) and drawn in pixels of
the stored image, so one patient looks the same at any resolution. Only numpy is used.

Why this module is longer than fedspine's ~600-line rule: it is one model. Most of it is
``_Scene``, one image being drawn (layout, anatomy, lesions, exposure, in that order, see
:func:`render_radiograph`): every step writes the same bone and gas canvases on one pixel grid
at one mm-to-pixel scale, and lesions are placed on the vertebrae the layout made. Split across
modules, the steps would only pass that shared state back and forth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedspine.data.labels import LESION_TYPES

VIEWS: tuple[str, ...] = ("LAT", "AP")
LEVEL_NAMES: tuple[str, ...] = ("T12", "L1", "L2", "L3", "L4", "L5")
# Findings that only a lateral view shows; the others show in both views.
LATERAL_ONLY: frozenset[str] = frozenset({"Spondylolysthesis", "Foraminal stenosis"})

DSN, FORAMINAL, OSTEOPHYTE, LISTHESIS, IMPLANT, COLLAPSE, OTHER = LESION_TYPES


@dataclass(frozen=True)
class Anatomy:
    """One patient's spine and body, in millimetres; the same in every view of that patient."""

    body_heights: tuple[float, ...]
    body_depths: tuple[float, ...]
    body_widths: tuple[float, ...]
    disc_heights: tuple[float, ...]
    lordosis_deg: float
    sacral_slope_deg: float
    scoliosis_deg: float
    tilt_deg: float
    shift: tuple[float, float]
    facing: int
    trunk_ap_mm: float
    trunk_lat_mm: float
    bone_density: float
    degeneration: float
    axial_rotation: float
    physiologic_wedge: tuple[float, ...]
    spurs: tuple[tuple[int, int, int, float], ...] = ()


@dataclass(frozen=True)
class Lesion:
    """One finding of one patient: where (vertebra or disc below it), how severe, which variant.

    ``level`` indexes :data:`LEVEL_NAMES` (a disc finding at level k is the disc below k).
    ``side`` is the endplate (-1 upper, +1 lower); ``corner`` the body's side (+1 anterior,
    -1 posterior on a lateral view; right or left on an AP view); ``span`` the number of fused
    motion segments for implants; ``severity`` in [0, 1] scales size and contrast.
    """

    lesion_type: str
    level: int
    severity: float
    side: int = 1
    corner: int = 1
    variant: str = ""
    span: int = 1


@dataclass(frozen=True)
class LesionBox:
    """A lesion's bounding box in pixel coordinates of the stored image."""

    lesion_type: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass(frozen=True)
class Imaging:
    """How a site's X-ray chain turns attenuation into stored image values."""

    fov_mm: float = 260.0  # detector width imaged (the short side)
    dose: float = 1.0  # relative photon fluence: lower is noisier
    bone_contrast: float = 1.0  # bone attenuation relative to soft tissue (tube voltage)
    gamma: float = 1.0  # display contrast curve
    edge_enhance: float = 0.5  # unsharp-mask gain of the processing
    range_compression: float = 0.75  # how much of the wide-area signal is flattened
    heel: float = 0.15  # top-to-bottom exposure gradient (anode heel effect)
    blur_mm: float = 0.45  # focal spot and detector unsharpness


def sample_anatomy(rng: np.random.Generator, age_factor: float = 0.5) -> Anatomy:
    """A random patient. ``age_factor`` in [0, 1] raises benign degenerative variation."""
    scale = float(rng.normal(1.0, 0.07))
    heights = 27.5 * scale * np.array([0.88, 0.93, 0.97, 1.0, 1.0, 0.97])
    heights *= 1.0 + rng.normal(0.0, 0.035, 6)
    depths = 40.0 * scale * np.array([0.92, 0.95, 0.98, 1.0, 1.02, 1.03]) * rng.normal(1, 0.03)
    widths = 46.0 * scale * np.array([0.9, 0.94, 0.98, 1.02, 1.06, 1.1]) * rng.normal(1, 0.04)
    degeneration = float(np.clip(rng.beta(2.0, 3.0) * (0.6 + 0.8 * age_factor), 0.0, 1.0))
    discs = 9.5 * scale * np.array([0.7, 0.8, 0.9, 1.0, 1.05, 0.95])
    discs *= np.clip(1.0 + rng.normal(0.0, 0.12, 6) - 0.18 * degeneration * rng.random(6), 0.6, 1.4)
    wedge = np.clip(rng.normal(0.03, 0.03, 6), 0.0, 0.1) * np.array([1.5, 1.2, 0.8, 0.5, 0.3, 0.3])
    spurs = []
    for _ in range(rng.poisson(0.5 + 3.5 * degeneration)):
        spurs.append(
            (
                int(rng.integers(1, 6)),
                int(rng.choice([-1, 1])),
                int(rng.choice([-1, 1, 1])),
                float(rng.uniform(0.6, 2.2)),
            )
        )
    return Anatomy(
        body_heights=tuple(float(h) for h in heights),
        body_depths=tuple(float(d) for d in depths),
        body_widths=tuple(float(w) for w in widths),
        disc_heights=tuple(float(d) for d in discs),
        lordosis_deg=float(rng.uniform(20.0, 55.0)),
        sacral_slope_deg=float(rng.uniform(30.0, 50.0)),
        scoliosis_deg=float(rng.normal(0.0, 4.0)),
        tilt_deg=float(rng.normal(0.0, 2.5)),
        shift=(float(rng.normal(0.0, 0.045)), float(rng.normal(0.0, 0.035))),
        facing=int(rng.choice([-1, 1])),
        trunk_ap_mm=float(rng.uniform(190.0, 320.0)),
        trunk_lat_mm=float(rng.uniform(280.0, 400.0)),
        bone_density=float(np.clip(rng.normal(1.0 - 0.25 * age_factor, 0.12), 0.55, 1.25)),
        degeneration=degeneration,
        axial_rotation=float(rng.normal(0.0, 0.06)),
        physiologic_wedge=tuple(float(w) for w in wedge),
        spurs=tuple(spurs),
    )


def sample_lesion(rng: np.random.Generator, lesion_type: str, view_hint: str = "LAT") -> Lesion:
    """One finding of the given VinDr type with a clinically plausible level and severity."""
    severity = float(np.clip(rng.beta(2.2, 1.5), 0.05, 1.0))
    if lesion_type == DSN:
        level = int(rng.choice([1, 2, 3, 4, 5], p=[0.06, 0.1, 0.18, 0.33, 0.33]))
        return Lesion(DSN, level, severity)
    if lesion_type == FORAMINAL:
        level = int(rng.choice([2, 3, 4, 5], p=[0.1, 0.2, 0.4, 0.3]))
        return Lesion(FORAMINAL, level, severity)
    if lesion_type == OSTEOPHYTE:
        return Lesion(
            OSTEOPHYTE,
            int(rng.choice([1, 2, 3, 4, 5], p=[0.12, 0.2, 0.26, 0.25, 0.17])),
            severity,
            side=int(rng.choice([-1, 1])),
            corner=int(rng.choice([1, 1, 1, -1]))
            if view_hint == "LAT"
            else int(rng.choice([-1, 1])),
        )
    if lesion_type == LISTHESIS:
        level = int(rng.choice([3, 4, 5], p=[0.2, 0.45, 0.35]))
        return Lesion(LISTHESIS, level, severity)
    if lesion_type == IMPLANT:
        span = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        top = int(rng.integers(max(1, 3 - span), 6 - span + 1))
        variant = "cage" if rng.random() < 0.4 else ""
        return Lesion(IMPLANT, top, 1.0, span=span, variant=variant)
    if lesion_type == COLLAPSE:
        level = int(rng.choice([1, 2, 3, 4, 5], p=[0.35, 0.25, 0.18, 0.12, 0.1]))
        return Lesion(
            COLLAPSE, level, severity, variant=str(rng.choice(["wedge", "wedge", "biconcave"]))
        )
    if lesion_type == OTHER:
        return Lesion(
            OTHER,
            int(rng.integers(1, 6)),
            severity,
            side=int(rng.choice([-1, 1])),
            variant=str(rng.choice(["sclerotic", "sclerotic", "lytic", "schmorl"])),
        )
    raise ValueError(f"unknown lesion type {lesion_type!r}; expected one of {LESION_TYPES}")


def visible_in(lesion: Lesion, view: str) -> bool:
    """Whether a finding can show in a view (listhesis and foramina need a lateral view)."""
    return view == "LAT" or lesion.lesion_type not in LATERAL_ONLY


def render_radiograph(
    rng: np.random.Generator,
    anatomy: Anatomy,
    lesions: tuple[Lesion, ...] | list[Lesion],
    view: str,
    rows: int,
    cols: int,
    imaging: Imaging,
) -> tuple[np.ndarray, list[LesionBox]]:
    """Draw one radiograph (float32 in [0, 1], bone bright) and the boxes of its visible lesions."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    px_per_mm = cols / imaging.fov_mm
    shown = [les for les in lesions if visible_in(les, view)]
    scene = _Scene(rng, anatomy, view, rows, cols, px_per_mm, imaging)
    scene.layout(shown)
    scene.draw_anatomy()
    boxes = scene.draw_lesions(shown)
    image = scene.expose()
    kept = []
    for box in boxes:
        x0, y0 = max(box.xmin, 0.0), max(box.ymin, 0.0)
        x1, y1 = min(box.xmax, cols - 1.0), min(box.ymax, rows - 1.0)
        if x1 - x0 >= 2.0 and y1 - y0 >= 2.0:
            kept.append(LesionBox(box.lesion_type, x0, y0, x1, y1))
    return image, kept


@dataclass
class _Body:
    level: int
    cx: float
    cy: float
    phi: float
    a: float
    b: float
    wedge: float = 0.0
    concavity: float = 0.05
    density: float = 1.0
    sclerosis: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def frame(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors (across the body, down the spine) in image (x, y)."""
        across = np.array([math.cos(self.phi), -math.sin(self.phi)])
        down = np.array([math.sin(self.phi), math.cos(self.phi)])
        return across, down

    def point(self, u: float, v: float, facing: int) -> tuple[float, float]:
        across, down = self.frame()
        p = np.array([self.cx, self.cy]) + facing * u * across + v * down
        return float(p[0]), float(p[1])


class _Scene:
    """One image being drawn: geometry in pixels, attenuation canvases, then exposure."""

    def __init__(
        self,
        rng: np.random.Generator,
        anatomy: Anatomy,
        view: str,
        rows: int,
        cols: int,
        px_per_mm: float,
        imaging: Imaging,
    ) -> None:
        # separate streams, so a lesion changes its own pixels and not the anatomy's texture or noise
        seeds = rng.integers(0, 2**63, size=3)
        self.rng, self.lesion_rng, self.noise_rng = (np.random.default_rng(int(x)) for x in seeds)
        self.anat = anatomy
        self.view = view
        self.shape = (rows, cols)
        self.k = px_per_mm
        self.imaging = imaging
        self.facing = anatomy.facing if view == "LAT" else 1
        self.bone = np.zeros(self.shape, np.float32)
        self.gas = np.zeros(self.shape, np.float32)
        self.bodies: list[_Body] = []
        self.sacrum: _Body | None = None

    # geometry ----------------------------------------------------------------------------
    def layout(self, lesions: list[Lesion]) -> None:
        anat, k = self.anat, self.k
        heights = np.array(anat.body_heights) * k
        discs = np.array(anat.disc_heights) * k
        half_w = np.array(anat.body_depths if self.view == "LAT" else anat.body_widths) * k / 2
        wedge = np.array(anat.physiologic_wedge) if self.view == "LAT" else np.zeros(6)
        density = np.ones(6) * anat.bone_density
        concavity = np.full(6, 0.04)
        sclerosis = np.zeros((7, 2))
        for les in lesions:
            s = les.severity
            if les.lesion_type == DSN:
                discs[les.level] *= 1.0 - (0.4 + 0.5 * s)
                sclerosis[les.level, 1] += 0.6 * s
                sclerosis[les.level + 1, 0] += 0.6 * s
            elif les.lesion_type == FORAMINAL:
                discs[les.level] *= 1.0 - 0.25 * s
            elif les.lesion_type == COLLAPSE:
                loss = 0.2 + 0.45 * s
                if les.variant == "wedge" and self.view == "LAT":
                    wedge[les.level] = min(0.7, wedge[les.level] + 1.5 * loss)
                    heights[les.level] *= 1.0 - 0.35 * loss
                else:
                    heights[les.level] *= 1.0 - loss
                    concavity[les.level] = 0.04 + (0.5 * loss if les.variant == "biconcave" else 0)
                density[les.level] *= 1.0 + 0.35 * s
                sclerosis[les.level] += 0.4 * s
        if self.view == "LAT":
            span = math.radians(anat.lordosis_deg)
            angles = [self.facing * span * (0.3 - (i / 5.0) ** 1.4) for i in range(6)]
            sacrum_phi = -self.facing * math.radians(anat.sacral_slope_deg)
        else:
            scol = math.radians(anat.scoliosis_deg)
            angles = [scol * (0.5 - i / 5.0) * 2 for i in range(6)]
            sacrum_phi = 0.0
        pos = np.zeros(2)
        bodies = []
        for i in range(6):
            down = np.array([math.sin(angles[i]), math.cos(angles[i])])
            centre = pos + down * heights[i] / 2
            bodies.append(
                _Body(
                    i,
                    float(centre[0]),
                    float(centre[1]),
                    angles[i],
                    float(half_w[i]),
                    float(heights[i] / 2),
                    wedge=float(wedge[i]),
                    concavity=float(concavity[i]),
                    density=float(density[i]),
                    sclerosis=[float(x) for x in sclerosis[i]],
                )
            )
            pos = centre + down * (heights[i] / 2 + discs[i])
        down = np.array([math.sin(sacrum_phi), math.cos(sacrum_phi)])
        s_h = 26.0 * k * anat.body_heights[3] / 27.5
        sacrum_c = pos + down * s_h / 2
        sacrum = _Body(
            6,
            float(sacrum_c[0]),
            float(sacrum_c[1]),
            sacrum_phi,
            float(half_w[5] * 1.02),
            s_h / 2,
            sclerosis=[float(x) for x in sclerosis[6]],
        )
        for les in lesions:
            if les.lesion_type == LISTHESIS and self.view == "LAT":
                slip = (0.1 + 0.35 * les.severity) * 2 * half_w[les.level]
                across, _ = bodies[les.level].frame()
                for body in bodies[: les.level + 1]:
                    body.cx += float(self.facing * across[0] * slip)
                    body.cy += float(self.facing * across[1] * slip)
        # place the L1-L5 midpoint, then tilt the whole spine about it
        top = np.array(bodies[1].point(0, -bodies[1].b, self.facing))
        bottom = np.array(bodies[5].point(0, bodies[5].b, self.facing))
        rows, cols = self.shape
        target = np.array([cols * (0.5 + anat.shift[0]), rows * (0.5 + anat.shift[1])])
        if self.view == "LAT":
            target[0] -= self.facing * 0.04 * cols
        offset = target - (top + bottom) / 2
        tilt = math.radians(anat.tilt_deg)
        rot = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
        for body in [*bodies, sacrum]:
            p = rot @ (np.array([body.cx, body.cy]) + offset - target) + target
            body.cx, body.cy = float(p[0]), float(p[1])
            body.phi -= tilt
        self.bodies, self.sacrum = bodies, sacrum
        self.discs = discs

    # anatomy -----------------------------------------------------------------------------
    def draw_anatomy(self) -> None:
        for body in self.bodies:
            self._vertebral_body(body)
            if self.view == "LAT":
                self._posterior_elements_lateral(body)
            else:
                self._posterior_elements_ap(body)
        self._sacrum_and_pelvis()
        for level, endplate, corner, length in self.anat.spurs:
            self._spur(self.bodies[level], endplate, corner, length * self.k, 0.8)
        self._bowel_gas()

    def _vertebral_body(self, body: _Body) -> None:
        k = self.k
        ext = max(body.a, body.b) * 1.35 + 4
        win = _window(self.shape, body.cx, body.cy, ext, ext)
        if win is None:
            return
        sl, dx, dy = win
        u, v = _local(dx, dy, body.phi)
        ua = u * self.facing
        un = np.clip(ua / body.a, -1.3, 1.3)
        half_h = body.b * (1.0 - body.wedge * (1.0 + un) / 2.0)
        half_h = half_h * (1.0 - body.concavity * np.clip(1.0 - un**2, 0.0, 1.0))
        vn = v * body.b / np.maximum(half_h, 0.3)
        waist = 0.06 if self.view == "LAT" else 0.1
        a_eff = body.a * (1.0 - waist * np.clip(1.0 - (vn / body.b) ** 2, 0.0, 1.0))
        un_eff = ua * body.a / a_eff
        radius = min(body.a, body.b) * 0.3
        wobble = _smooth_noise(self.rng, un_eff.shape, 2.5 * k) * 0.35 * k
        sdf = _rounded_rect_sdf(un_eff, vn, body.a, body.b, radius) + wobble
        cover = np.clip(0.5 - sdf / 0.9, 0.0, 1.0)
        t = max(0.9 * k, 0.7)
        rim = np.exp(-(((sdf + t) / t) ** 2))
        end = np.clip((np.abs(vn) / body.b - 0.55) / 0.45, 0.0, 1.0)
        top_bottom = np.where(vn < 0, body.sclerosis[0], body.sclerosis[1])
        rim = rim * (1.0 + 0.5 * end + top_bottom * end * 2.0)
        nu = np.clip(1.0 - (ua / body.a) ** 2, 0.0, 1.0)
        profile = 0.7 + 0.3 * np.sqrt(nu) if self.view == "LAT" else 0.4 + 0.6 * np.sqrt(nu)
        tex = _texture(self.rng, cover.shape, 0.6 * k, 1.2 * k)
        dens = body.density
        fill = 0.3 * dens * profile * (1.0 + 0.12 * tex)
        sclerosis_band = top_bottom * end**3 * 0.25
        self.bone[sl] += cover * (fill + sclerosis_band) + 0.3 * rim * (0.5 + 0.5 * dens)
        if self.view == "LAT" and self.rng.random() < 0.7:
            # basivertebral vein channel: a normal dark notch in the posterior wall
            cx, cy = body.point(-body.a * 0.85, 0.0, self.facing)
            self._ellipse(self.bone, cx, cy, 1.8 * k, 1.2 * k, body.phi, -0.1 * dens)

    def _posterior_elements_lateral(self, body: _Body) -> None:
        k, a, b, d = self.k, body.a, body.b, body.density
        plate = self._plate_local
        plate(body, (-a + 1.0, -a - 13 * k), -0.33 * b, 0.27 * b, 0.0, 0.24 * d, 0.45)
        plate(body, (-a - 13 * k, -a - 25 * k), -0.05 * b, b + 4 * k, -0.12, 0.2 * d, 0.5)
        length = (22 + 6 * (body.level in (2, 3)) + 4 * self.rng.random()) * k
        start = -a - 22 * k
        plate(body, (start, start - length), 0.2 * b, 0.42 * b, 0.2, 0.17 * d, 0.55)
        if body.level == 0:
            for side in (-1, 1):
                start = body.point(-a - 20 * k, side * 3 * k, self.facing)
                self._rib(start, -self.facing, side)

    def _posterior_elements_ap(self, body: _Body) -> None:
        k, a, b, d = self.k, body.a, body.b, body.density
        rot = self.anat.axial_rotation
        cap = self._capsule_local
        for side in (-1, 1):
            pu = side * a * (0.63 + 0.05 * body.level / 5) + rot * a * 0.6
            cx, cy = body.point(pu, -0.3 * b, 1)
            rx = (3.2 + 0.5 * body.level) * k * (1 - side * rot * 1.5)
            self._ellipse(self.bone, cx, cy, rx, 6.5 * k, body.phi, 0.24 * d, shell=0.75)
            tp_len = (8, 11, 15, 20, 16, 12)[body.level] * k
            up = 0.0 if body.level < 5 else -0.3 * b
            cap(
                body,
                (side * a * 0.7, -0.2 * b),
                (side * (a + tp_len), -0.25 * b + up),
                4.5 * k,
                3.0 * k,
                0.16 * d,
                0.4,
            )
            fu = side * a * 0.42 + rot * a * 0.4
            cap(body, (fu, 0.5 * b), (fu * 1.05, b + 6 * k), 3.4 * k, 2.8 * k, 0.14 * d, 0.8)
            cap(body, (side * a * 0.58, 0.0), (rot * a, 0.65 * b), 5.0 * k, 3.5 * k, 0.1 * d, 0.3)
            if body.level == 0:
                self._rib(body.point(side * (a + tp_len * 0.8), -0.25 * b, 1), side, 1)
        su = rot * a * 1.2
        cap(
            body, (su, 0.0), (su, b + 0.7 * self.discs[body.level]), 4.0 * k, 2.8 * k, 0.18 * d, 0.6
        )

    def _rib(self, start: tuple[float, float], direction: int, side: int) -> None:
        k = self.k
        x0, y0 = start
        pts = []
        for i in range(7):
            t = i / 6
            if self.view == "AP":
                pts.append((x0 + direction * t * 75 * k, y0 + (t**1.4) * 45 * k - 6 * k))
            else:
                pts.append((x0 + direction * t * 45 * k, y0 + side * 8 * k + (t**1.3) * 40 * k))
        level = 0.15 if self.view == "AP" else 0.08
        self._tube(self.bone, pts, [6.0 * k * (1 - 0.4 * i / 6) for i in range(7)], level, 0.7)

    def _sacrum_and_pelvis(self) -> None:
        k, sac, f = self.k, self.sacrum, self.facing
        assert sac is not None
        across, down = sac.frame()
        if self.view == "LAT":
            self._vertebral_body(sac)
            pts, radii = [], []
            pos, width, bend = np.array([sac.cx, sac.cy]) + down * sac.b * 0.5, sac.a * 0.95, 0.0
            for _ in range(5):
                pts.append(tuple(pos))
                radii.append(width)
                bend += 0.16
                step = down * math.cos(bend) - f * across * math.sin(bend)
                pos = pos + step * 17 * k
                width *= 0.78
            self._tube(self.bone, pts, radii, 0.36, 0.35)
            # the iliac wings overlap the lumbosacral junction, in two slightly offset contours
            for j, off in enumerate((0.0, 7.0)):
                cx, cy = sac.point(-sac.a * 0.9 + off * k, 10 * k + off * k, f)
                self._ilium(cx, cy, 55 * k, 50 * k, 0.2 * f, 0.07 + 0.02 * j)
        else:
            top = np.array([sac.cx, sac.cy]) - down * sac.b
            half = sac.a * 1.6
            pts = [tuple(top + down * (i * 22) * k) for i in range(5)]
            self._tube(self.bone, pts, [half * (1 - 0.2 * i) for i in range(5)], 0.2, 0.3)
            for i in range(1, 5):
                for side in (-1, 1):
                    fp = top + down * (i * 20 - 6) * k + across * side * half * (0.5 - 0.06 * i)
                    self._ellipse(self.bone, fp[0], fp[1], 3.5 * k, 3.0 * k, 0.0, -0.08)
            for side in (-1, 1):
                c = top + across * side * (half + 40 * k) + down * 55 * k
                self._ilium(c[0], c[1], 58 * k, 80 * k, -side * 0.3, 0.16)

    def _ilium(
        self, cx: float, cy: float, rx: float, ry: float, angle: float, level: float
    ) -> None:
        """An iliac wing: a broad thin plate whose crest (upper rim) is dense."""
        win = _window(self.shape, cx, cy, max(rx, ry) + 3, max(rx, ry) + 3)
        if win is None:
            return
        sl, dx, dy = win
        c, s = math.cos(angle), math.sin(angle)
        xr = (dx * c + dy * s) / rx
        yr = (-dx * s + dy * c) / ry
        rho2 = xr**2 + yr**2
        sdf = (rho2 - 1.0) / (2.0 * np.sqrt((xr / rx) ** 2 + (yr / ry) ** 2) + 1e-6)
        t = max(1.5 * self.k, 0.8)
        crest = np.exp(-(((sdf + t) / t) ** 2)) * np.clip(-yr * 2.0, 0.0, 1.0)
        fill = np.clip(0.5 - sdf / 1.5, 0.0, 1.0) * (0.6 + 0.4 * np.clip(-yr, 0.0, 1.0))
        self.bone[sl] += level * (0.7 * fill + 1.2 * crest)

    def _bowel_gas(self) -> None:
        rows, cols = self.shape
        k, rng = self.k, self.rng
        spine_x = float(np.mean([b.cx for b in self.bodies]))
        for _ in range(rng.poisson(4)):
            if self.view == "LAT":
                x = spine_x + self.facing * rng.uniform(0.18, 0.55) * cols
            else:
                x = rng.uniform(0.1, 0.9) * cols
            y = rng.uniform(0.1, 0.85) * rows
            # a loop of bowel: a cluster of small bubbles along a short arc
            angle, size = rng.uniform(0, math.pi), rng.uniform(6, 16) * k
            for _ in range(rng.integers(3, 9)):
                angle += rng.normal(0, 0.6)
                x += math.cos(angle) * size * 0.9
                y += math.sin(angle) * size * 0.9
                r = size * rng.uniform(0.4, 1.0)
                self._ellipse(
                    self.gas, x, y, r, r * rng.uniform(0.6, 1.0), angle, 0.01 * r / k, soft=0.6
                )

    # lesions -----------------------------------------------------------------------------
    def draw_lesions(self, lesions: list[Lesion]) -> list[LesionBox]:
        boxes = []
        for les in lesions:
            box = getattr(self, "_lesion_" + _METHOD[les.lesion_type])(les)
            if box is not None:
                boxes.append(LesionBox(les.lesion_type, *box))
        return boxes

    def _lesion_osteophyte(self, les: Lesion) -> tuple[float, ...]:
        body = self.bodies[les.level]
        length = (5.0 + 10.0 * les.severity) * self.k
        pts = self._spur(body, les.side, les.corner, length, 1.0 + 0.5 * les.severity)
        return _bbox(pts, pad=max(2.0 * self.k, 1.5))

    def _lesion_disc(self, les: Lesion) -> tuple[float, ...]:
        upper, lower = self.bodies[les.level], self._below(les.level)
        for body, sign in ((upper, 1), (lower, -1)):
            self._band(body, sign, 0.12 * les.severity)
        if les.severity > 0.6 and self.lesion_rng.random() < 0.5:
            # vacuum phenomenon: gas in a degenerate disc
            mid = (
                np.array(upper.point(0, upper.b, self.facing))
                + lower.point(0, -lower.b, self.facing)
            ) / 2
            self._ellipse(
                self.gas, mid[0], mid[1], upper.a * 0.5, 0.6 * self.k, upper.phi, 0.2, shell=0.0
            )
        pts = [upper.point(u, upper.b * 0.55, self.facing) for u in (-upper.a, upper.a)]
        pts += [lower.point(u, -lower.b * 0.55, self.facing) for u in (-lower.a, lower.a)]
        return _bbox(pts, pad=2.0 * self.k)

    def _lesion_collapse(self, les: Lesion) -> tuple[float, ...]:
        body = self.bodies[les.level]
        self._band(body, -1, 0.1 * les.severity)
        self._band(body, 1, 0.1 * les.severity)
        pts = [body.point(u, v, self.facing) for u in (-body.a, body.a) for v in (-body.b, body.b)]
        return _bbox(pts, pad=2.5 * self.k)

    def _lesion_listhesis(self, les: Lesion) -> tuple[float, ...]:
        upper, lower = self.bodies[les.level], self._below(les.level)
        pts = [upper.point(u, v, self.facing) for u in (-upper.a, upper.a) for v in (0.0, upper.b)]
        pts += [
            lower.point(u, v, self.facing) for u in (-lower.a, lower.a) for v in (-lower.b, 0.0)
        ]
        return _bbox(pts, pad=2.0 * self.k)

    def _lesion_foraminal(self, les: Lesion) -> tuple[float, ...]:
        k, s = self.k, les.severity
        upper, lower = self.bodies[les.level], self._below(les.level)
        # a posterior spur off the lower endplate, and a hypertrophic superior facet below
        self._spur(upper, 1, -1, (4.0 + 7.0 * s) * k, 1.2)
        cx, cy = lower.point(-lower.a - (16 - 5 * s) * k, -lower.b - (2 + 3 * s) * k, self.facing)
        self._ellipse(
            self.bone,
            cx,
            cy,
            (4 + 4 * s) * k,
            (6 + 5 * s) * k,
            lower.phi,
            0.15 + 0.15 * s,
            shell=0.5,
        )
        pts = [upper.point(-upper.a - u * k, 0.1 * upper.b, self.facing) for u in (-3, 22)]
        pts += [lower.point(-lower.a - u * k, -0.3 * lower.b, self.facing) for u in (-3, 22)]
        return _bbox(pts, pad=1.5 * k)

    def _lesion_implant(self, les: Lesion) -> tuple[float, ...]:
        k, f = self.k, self.facing
        metal = 2.4
        bodies = [
            self._below(i - 1) if i > 5 else self.bodies[i]
            for i in range(les.level, les.level + les.span + 1)
        ]
        pts: list[tuple[float, float]] = []
        heads: dict[int, list[tuple[float, float]]] = {-1: [], 1: []}
        for body in bodies:
            if self.view == "LAT":
                tail = body.point(-body.a - 20 * k, -0.1 * body.b, f)
                tip = body.point(body.a * 0.6, 0.05 * body.b, f)
                self._screw(tail, tip, 3.0 * k, metal)
                heads[1].append(tail)
                pts += [tail, tip]
            else:
                for side in (-1, 1):
                    tail = body.point(side * (body.a * 0.75 + 7 * k), -0.3 * body.b, 1)
                    tip = body.point(side * body.a * 0.2, -0.25 * body.b, 1)
                    self._screw(tail, tip, 3.0 * k, metal)
                    heads[side].append(tail)
                    pts += [tail, tip]
        for side in (-1, 1):
            chain = heads[side]
            for p, q in zip(chain[:-1], chain[1:], strict=True):
                self._capsule(self.bone, p, q, 2.8 * k, 2.8 * k, metal * 0.9, 0.2)
            for p in chain:
                self._ellipse(self.bone, p[0], p[1], 5.5 * k, 5.5 * k, 0.0, metal * 0.8, shell=0.3)
        if les.variant == "cage":
            for upper in bodies[:-1]:
                c = np.array(upper.point(0, upper.b + 0.5 * self.discs[upper.level], f))
                self._ellipse(
                    self.bone, c[0], c[1], upper.a * 0.55, 3.5 * k, upper.phi, 0.25, shell=0.9
                )
        return _bbox(pts, pad=6.0 * k)

    def _lesion_other(self, les: Lesion) -> tuple[float, ...]:
        k, s = self.k, les.severity
        body = self.bodies[les.level]
        rng = self.lesion_rng
        if les.variant == "schmorl":
            r = (2.5 + 3.5 * s) * k
            cx, cy = body.point(
                rng.uniform(-0.4, 0.4) * body.a, les.side * (body.b - r * 0.5), self.facing
            )
            self._ellipse(self.bone, cx, cy, r * 1.3, r, body.phi, -0.25 * body.density, shell=0.0)
            self._ellipse(self.bone, cx, cy, r * 1.6, r * 1.3, body.phi, 0.1 + 0.12 * s, shell=1.0)
            r_box = r * 1.6
        else:
            r = (5.0 + 8.0 * s) * k
            cx, cy = body.point(
                rng.uniform(-0.5, 0.5) * body.a, rng.uniform(-0.45, 0.45) * body.b, self.facing
            )
            sign = 1.0 if les.variant == "sclerotic" else -0.8
            self._ellipse(
                self.bone,
                cx,
                cy,
                r,
                r * rng.uniform(0.7, 1.0),
                rng.uniform(0, 3),
                sign * (0.2 + 0.3 * s),
                shell=0.0,
                soft=0.4,
            )
            r_box = r
        return (cx - r_box - 2 * k, cy - r_box - 2 * k, cx + r_box + 2 * k, cy + r_box + 2 * k)

    def _below(self, level: int) -> _Body:
        assert self.sacrum is not None
        return self.bodies[level + 1] if level < 5 else self.sacrum

    def _band(self, body: _Body, endplate: int, level: float) -> None:
        """Subchondral sclerosis: a dense band just inside one endplate."""
        cx, cy = body.point(0.0, endplate * body.b * 0.8, self.facing)
        self._ellipse(
            self.bone, cx, cy, body.a * 0.95, body.b * 0.2, body.phi, level, shell=0.0, soft=0.5
        )

    def _spur(self, body: _Body, endplate: int, corner: int, length: float, level: float) -> list:
        base_u, base_v = corner * body.a * 0.96, endplate * body.b * 0.78
        tip_u = corner * (body.a + 0.7 * length)
        tip_v = endplate * (body.b + 0.55 * length)
        p0 = body.point(base_u, base_v, self.facing)
        p1 = body.point(tip_u, tip_v, self.facing)
        self._capsule(self.bone, p0, p1, 0.3 * length + 0.6, 0.1 * length + 0.3, 0.3 * level, 0.4)
        return [p0, p1, body.point(corner * body.a * 0.85, endplate * body.b, self.facing)]

    def _screw(
        self, tail: tuple[float, float], tip: tuple[float, float], radius: float, metal: float
    ) -> None:
        self._capsule(self.bone, tail, tip, radius, radius * 0.7, metal, 0.15)
        n = max(2, int(math.dist(tail, tip) / max(2.0 * self.k, 1.0)))
        for i in range(1, n):
            t = i / n
            c = (tail[0] + t * (tip[0] - tail[0]), tail[1] + t * (tip[1] - tail[1]))
            self._ellipse(
                self.bone, c[0], c[1], radius * 1.25, radius * 1.25, 0.0, metal * 0.12, shell=0.0
            )

    # primitives --------------------------------------------------------------------------
    def _plate_local(self, body, u_range, v_centre, half_h, angle, level, shell) -> None:
        """A rounded bony plate given in a body's frame (u across, v down), tilted by ``angle``."""
        u0, u1 = u_range
        cx, cy = body.point((u0 + u1) / 2, v_centre, self.facing)
        half_len = abs(u1 - u0) / 2
        ext = math.hypot(half_len, half_h) + 3
        win = _window(self.shape, cx, cy, ext, ext)
        if win is None:
            return
        sl, dx, dy = win
        u, v = _local(dx, dy, body.phi)
        ua = u * self.facing * (1 if u1 > u0 else -1)
        c, s = math.cos(angle), math.sin(angle)
        pu, pv = ua * c + v * s, -ua * s + v * c
        radius = 0.45 * min(half_len, half_h)
        sdf = _rounded_rect_sdf(pu, pv, half_len, half_h, radius)
        self._fill_from_sdf(self.bone, sl, sdf, min(half_len, half_h), level, shell)

    def _tube(self, canvas, points, radii, level, shell) -> None:
        """A smooth union of tapered segments (sacrum, ribs): one outline, no seams."""
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        r = max(radii)
        cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        win = _window(
            self.shape, cx, cy, (max(xs) - min(xs)) / 2 + r + 2, (max(ys) - min(ys)) / 2 + r + 2
        )
        if win is None:
            return
        sl, dx, dy = win
        best = np.full((dy.shape[0], dx.shape[1]), np.inf, np.float32)
        best_rad = np.ones_like(best)
        segments = zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True)
        for p, q, r0, r1 in segments:
            sx, sy = q[0] - p[0], q[1] - p[1]
            px, py = dx + cx - p[0], dy + cy - p[1]
            t = np.clip((px * sx + py * sy) / max(sx * sx + sy * sy, 1e-6), 0.0, 1.0)
            rad = np.maximum(r0 + (r1 - r0) * t, 0.4)
            sdf = np.hypot(px - t * sx, py - t * sy) - rad
            closer = sdf < best
            best = np.where(closer, sdf, best)
            best_rad = np.where(closer, rad, best_rad)
        self._fill_from_sdf(canvas, sl, best, best_rad, level, shell)

    def _fill_from_sdf(self, canvas, sl, sdf, size, level, shell) -> None:
        """Projected bone from a signed distance: rounded interior plus a cortical rim."""
        depth = np.clip(-sdf / np.maximum(size, 0.5), 0.0, 1.0)
        thick = np.sqrt(depth * (2.0 - depth))
        t = max(0.8 * self.k, 0.7)
        rim = np.exp(-(((sdf + t) / t) ** 2))
        cover = np.clip(0.5 - sdf / 0.9, 0.0, 1.0)
        canvas[sl] += level * (cover * (1 - shell) * thick + shell * rim)

    def _capsule_local(self, body, p_uv, q_uv, r0, r1, level, shell) -> None:
        p = body.point(p_uv[0], p_uv[1], self.facing)
        q = body.point(q_uv[0], q_uv[1], self.facing)
        self._capsule(self.bone, p, q, r0, r1, level, shell)

    def _capsule(self, canvas, p, q, r0, r1, level, shell) -> None:
        """A tapered bone rod: projected thickness of a tube, with an optional cortical shell."""
        r = max(r0, r1)
        cx, cy = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
        half = math.dist(p, q) / 2 + r + 2
        win = _window(self.shape, cx, cy, half, half)
        if win is None:
            return
        sl, dx, dy = win
        sx, sy = q[0] - p[0], q[1] - p[1]
        seg2 = max(sx * sx + sy * sy, 1e-6)
        px, py = dx + cx - p[0], dy + cy - p[1]
        t = np.clip((px * sx + py * sy) / seg2, 0.0, 1.0)
        dist = np.hypot(px - t * sx, py - t * sy)
        rad = np.maximum(r0 + (r1 - r0) * t, 0.4)
        rho = dist / rad
        thick = np.sqrt(np.clip(1.0 - rho**2, 0.0, 1.0))
        ring = np.exp(-(((rho - 0.85) / 0.22) ** 2)) * np.clip(1.3 - rho, 0.0, 1.0)
        cover = np.clip((rad - dist) / 0.8 + 0.5, 0.0, 1.0)
        canvas[sl] += (level * cover * ((1 - shell) * thick + shell * ring)).astype(np.float32)

    def _ellipse(self, canvas, cx, cy, rx, ry, angle, level, shell=0.0, soft=0.0) -> None:
        """An ellipsoid's projection (shell=0), a cortical ring (shell=1), or a mix of both.

        ``soft`` > 0 gives a blurred blob instead (gas, sclerotic and lytic foci)."""
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        ext = max(rx, ry) * (1.0 + soft) + 3
        win = _window(self.shape, cx, cy, ext, ext)
        if win is None:
            return
        sl, dx, dy = win
        c, s = math.cos(angle), math.sin(angle)
        xr = (dx * c + dy * s) / rx
        yr = (-dx * s + dy * c) / ry
        rho2 = xr**2 + yr**2
        if soft > 0:
            canvas[sl] += level * np.exp(-((rho2 / (1.0 + soft) ** 2) ** 2) * 1.5)
            return
        # first-order signed distance in pixels: (rho^2 - 1) / |grad rho^2|
        grad = 2.0 * np.sqrt((xr / rx) ** 2 + (yr / ry) ** 2) + 1e-6
        sdf = (rho2 - 1.0) / grad
        thick = np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
        t = max(0.8 * self.k, 0.7)
        rim = np.exp(-(((sdf + t) / t) ** 2))
        cover = np.clip(0.5 - sdf / 0.9, 0.0, 1.0)
        canvas[sl] += level * (cover * (1 - shell) * thick + shell * rim)

    # exposure ----------------------------------------------------------------------------
    def expose(self) -> np.ndarray:
        rows, cols = self.shape
        im, k, rng = self.imaging, self.k, self.noise_rng
        soft = self._soft_tissue()
        density = soft + im.bone_contrast * self.bone - self.gas
        density = _blur(density, im.blur_mm * k, im.blur_mm * k)
        y = np.arange(rows, dtype=np.float32)[:, None] / rows - 0.5
        heel = 1.0 + im.heel * y * 2 * (1 if rng.random() < 0.8 else -1)
        counts_per_px = 6.0e5 * im.dose / (k * k)
        mean = counts_per_px * heel * np.exp(-density)
        counts = mean + np.sqrt(mean) * rng.standard_normal(self.shape, dtype=np.float32)
        signal = -np.log(np.maximum(counts, 0.5) / counts_per_px).astype(np.float32)
        low = _blur_coarse(signal, 30.0 * k)
        signal = signal - im.range_compression * (low - float(low.mean()))
        detail = signal - _blur(signal, 1.6 * k, 1.6 * k)
        signal = signal + im.edge_enhance * detail
        # auto-ranging on the anatomy, as a detector's histogram analysis does: air saturates
        roi = (soft[::3, ::3] > 0.55 * float(soft.max())) & (self.bone[::3, ::3] < 1.0)
        sample = signal[::3, ::3][roi] if roi.sum() > 50 else signal[::3, ::3].ravel()
        lo, hi = np.percentile(sample, [0.5, 99.9])
        hi += 0.1 * (hi - lo)
        out = np.clip((signal - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        out = 0.03 + 0.94 * out ** (1.0 / im.gamma)
        return out.astype(np.float32)

    def _soft_tissue(self) -> np.ndarray:
        """Water-equivalent path through the trunk: an elliptic cross-section, varying with height."""
        rows, cols = self.shape
        k, anat = self.k, self.anat
        x = np.arange(cols, dtype=np.float32)[None, :]
        yn = np.arange(rows, dtype=np.float32)[:, None] / rows - 0.5
        spine_x = float(np.mean([b.cx for b in self.bodies[1:]]))
        if self.view == "LAT":
            buttock = 25.0 * k * np.clip((yn - 0.15) / 0.35, 0.0, 1.0) ** 2
            back = spine_x - self.facing * ((75.0 + 0.12 * anat.trunk_ap_mm) * k + buttock)
            half = anat.trunk_ap_mm * k / 2 + buttock / 2
            centre = back + self.facing * half
            path = anat.trunk_lat_mm * 0.86 * (1.0 + 0.15 * yn)
        else:
            half = anat.trunk_lat_mm * k / 2 * (1.0 + 0.25 * np.clip(yn, 0.0, None))
            centre = spine_x
            path = anat.trunk_ap_mm * 0.9 * (1.0 + 0.1 * yn)
        rel = (x - centre) / half
        dens = 0.02 * path * np.sqrt(np.clip(1.0 - rel**2, 0.0, 1.0))
        if self.view == "AP":
            for side in (-1, 1):
                edge = np.abs(x - spine_x - side * (25 + 45 * (yn + 0.3)) * k) / (15 * k)
                dens = dens + 0.1 * np.clip(1.0 - edge, 0, 1) * np.clip((yn + 0.3) * 3, 0, 1)
        return dens.astype(np.float32)


_METHOD = {
    DSN: "disc",
    FORAMINAL: "foraminal",
    OSTEOPHYTE: "osteophyte",
    LISTHESIS: "listhesis",
    IMPLANT: "implant",
    COLLAPSE: "collapse",
    OTHER: "other",
}


def _window(shape, cx, cy, hx, hy):
    """Pixel slices around a point, clipped to the image, with offsets from that point."""
    rows, cols = shape
    x0, x1 = max(int(cx - hx), 0), min(int(cx + hx) + 2, cols)
    y0, y1 = max(int(cy - hy), 0), min(int(cy + hy) + 2, rows)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    return (slice(y0, y1), slice(x0, x1)), dx, dy


def _local(dx, dy, phi):
    c, s = math.cos(phi), math.sin(phi)
    return dx * c - dy * s, dx * s + dy * c


def _rounded_rect_sdf(u, v, a, b, r):
    qx = np.abs(u) - (a - r)
    qy = np.abs(v) - (b - r)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside - r


def _bbox(points, pad: float) -> tuple[float, float, float, float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return (min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad)


def _texture(rng, shape, sigma_x, sigma_y) -> np.ndarray:
    """Trabecular texture: band-passed noise, stretched along the spine axis, unit variance."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    fine = _blur(noise, max(sigma_x, 0.4), max(sigma_y, 0.4))
    coarse = _blur(noise, max(3 * sigma_x, 1.0), max(3 * sigma_y, 1.0))
    band = fine - coarse
    return band / (float(band.std()) + 1e-6)


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    """Unit-variance smooth noise (for irregular outlines), drawn on a coarse grid and upsampled."""
    f = max(1, int(sigma / 2))
    coarse = rng.standard_normal((shape[0] // f + 2, shape[1] // f + 2), dtype=np.float32)
    noise = _upsample(_blur(coarse, sigma / f, sigma / f), shape, f)
    return noise / (float(noise.std()) + 1e-6)


def _blur(image: np.ndarray, sigma_x: float, sigma_y: float) -> np.ndarray:
    """Separable Gaussian blur by shifted sums (the sigmas used here are small); edges extended."""
    out = image.astype(np.float32, copy=False)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma < 0.3:
            continue
        radius = int(math.ceil(2.5 * sigma))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps = (taps / taps.sum()).astype(np.float32)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(taps):
            acc += w * (padded[:, i : i + n] if axis == 1 else padded[i : i + n, :])
        out = acc
    return out


def _blur_coarse(image: np.ndarray, sigma: float) -> np.ndarray:
    """A wide Gaussian blur computed on a block-averaged copy, then upsampled bilinearly."""
    rows, cols = image.shape
    f = max(1, int(sigma / 3))
    r2, c2 = rows // f, cols // f
    small = image[: r2 * f, : c2 * f].reshape(r2, f, c2, f).mean(axis=(1, 3))
    return _upsample(_blur(small, sigma / f, sigma / f), (rows, cols), f)


def _upsample(small: np.ndarray, shape: tuple[int, int], f: int) -> np.ndarray:
    """Bilinear upsampling of a grid whose cells are ``f`` pixels, cropped to ``shape``."""
    rows, cols = shape
    r2, c2 = small.shape
    ys = np.clip((np.arange(rows) + 0.5) / f - 0.5, 0, r2 - 1)
    xs = np.clip((np.arange(cols) + 0.5) / f - 0.5, 0, c2 - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, r2 - 1), np.minimum(x0 + 1, c2 - 1)
    wy = (ys - y0)[:, None].astype(np.float32)
    wx = (xs - x0)[None, :].astype(np.float32)
    top = small[y0][:, x0] * (1 - wx) + small[y0][:, x1] * wx
    bottom = small[y1][:, x0] * (1 - wx) + small[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)
