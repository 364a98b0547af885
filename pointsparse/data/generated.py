"""Procedural labelled scenes, the embedded default data set (no downloads).

``outdoor_scene(seed)`` ray-casts a street scene the way a spinning 64-beam
LiDAR samples it (HDL-64E-like elevation fan, one return per ray, the nearest
surface wins so objects occlude what is behind them, range noise, density
falling with range). ``indoor_scene(seed)`` samples the surfaces of a
furnished room like a fused RGB-D scan. Both are deterministic in ``seed`` and
take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..tensor import as_int
from .sample import Sample

OUTDOOR_CLASSES = ("road", "sidewalk", "terrain", "building", "vegetation", "trunk", "pole", "car", "person")
INDOOR_CLASSES = ("floor", "wall", "ceiling", "table", "chair", "shelf")
_O = {name: i for i, name in enumerate(OUTDOOR_CLASSES)}
_I = {name: i for i, name in enumerate(INDOOR_CLASSES)}

# Mean return intensity (0..1) of each outdoor class; a weak cue, like a real sensor's.
_INTENSITY = {"road": 0.25, "sidewalk": 0.35, "terrain": 0.4, "building": 0.3, "vegetation": 0.45,
              "trunk": 0.35, "pole": 0.5, "car": 0.3, "person": 0.3}


def lidar_rays(beams: int = 64, azimuth_steps: int = 1024, fov_up: float = 2.0, fov_down: float = -24.8):
    """Unit ray directions ``(beams * azimuth_steps, 3)`` of a spinning LiDAR.
    Limits (checked before anything is allocated): ``beams`` 1..1024,
    ``azimuth_steps`` 1..65536, at most :data:`MAX_RAYS` rays in all,
    ``fov_up``/``fov_down`` elevations in [-90, 90] degrees."""
    _check_scene_args(beams=beams, azimuth_steps=azimuth_steps)
    for name, value in (("fov_up", fov_up), ("fov_down", fov_down)):
        if not (_is_number(value) and -90 <= value <= 90):
            raise ValueError(f"{name} must be an elevation in [-90, 90] degrees; got {value!r}")
    elev = np.deg2rad(np.linspace(fov_up, fov_down, beams))
    azim = np.linspace(0, 2 * np.pi, azimuth_steps, endpoint=False)
    e, a = np.meshgrid(elev, azim, indexing="ij")
    return np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)


class _Caster:
    """Nearest-hit bookkeeping over analytic primitives for a bundle of rays
    from one origin."""

    def __init__(self, origin, dirs, max_range):
        self.o = np.asarray(origin, dtype=np.float64)
        self.d = dirs
        self.t = np.full(len(dirs), max_range)
        self.label = np.full(len(dirs), -1, dtype=np.int64)
        with np.errstate(divide="ignore"):
            self.inv = 1.0 / np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)

    def _take(self, t, label):
        better = t < self.t
        self.t = np.where(better, t, self.t)
        self.label = np.where(better, label, self.label)

    def boxes(self, lo, hi, labels, keep_prob=None, rng=None):
        """Axis-aligned boxes ``lo/hi (B, 3)``, one label each (slab test)."""
        for b in range(len(lo)):
            t1 = (lo[b] - self.o) * self.inv
            t2 = (hi[b] - self.o) * self.inv
            tmin = np.minimum(t1, t2).max(1)
            tmax = np.maximum(t1, t2).min(1)
            hit = (tmax >= np.maximum(tmin, 0)) & (tmin > 0.3)
            if keep_prob is not None:
                hit &= rng.random(len(hit)) < keep_prob
            self._take(np.where(hit, tmin, np.inf), labels[b])

    def cylinders(self, centre, radius, z0, z1, label):
        """Vertical cylinders (``centre (B, 2)``, radius, z range per cylinder)."""
        d, o = self.d, self.o
        a = d[:, 0] ** 2 + d[:, 1] ** 2 + 1e-12
        for b in range(len(centre)):
            px, py = o[0] - centre[b, 0], o[1] - centre[b, 1]
            bb = 2 * (px * d[:, 0] + py * d[:, 1])
            c = px * px + py * py - radius[b] ** 2
            disc = bb * bb - 4 * a * c
            ok = disc >= 0
            t = (-bb - np.sqrt(np.where(ok, disc, 0))) / (2 * a)
            z = o[2] + t * d[:, 2]
            hit = ok & (t > 0.3) & (z >= z0[b]) & (z <= z1[b])
            self._take(np.where(hit, t, np.inf), label)

    def spheres(self, centre, radius, label, keep_prob, rng):
        """Porous ellipsoid-ish crowns: spheres where a hit is kept with ``keep_prob``."""
        d = self.d
        for b in range(len(centre)):
            oc = self.o - centre[b]
            bb = d @ oc
            c = oc @ oc - radius[b] ** 2
            disc = bb * bb - c
            ok = disc >= 0
            sq = np.sqrt(np.where(ok, disc, 0))
            # Enter the crown at a random depth: foliage returns come from inside it.
            t = -bb - sq * (1 - 0.6 * rng.random(len(d)))
            hit = ok & (t > 0.3) & (rng.random(len(d)) < keep_prob)
            self._take(np.where(hit, t, np.inf), label)

    def ground(self, road_half, walk_width, curb, heading):
        """Ground plane z=0 (road, terrain) and the sidewalks raised by ``curb``."""
        d, o = self.d, self.o
        dz = np.where(np.abs(d[:, 2]) < 1e-9, -1e-9, d[:, 2])
        c, s = np.cos(heading), np.sin(heading)
        for height in (0.0, curb):
            t = (height - o[2]) / dz
            x = o[0] + t * d[:, 0]
            y = o[1] + t * d[:, 1]
            lateral = np.abs(-s * x + c * y)
            on_walk = (lateral >= road_half) & (lateral < road_half + walk_width)
            if height == 0.0:
                label = np.where(lateral < road_half, _O["road"], _O["terrain"])
                hit = (t > 0) & ~on_walk
            else:
                label = np.full(len(d), _O["sidewalk"])
                hit = (t > 0) & on_walk
            self._take(np.where(hit, t, np.inf), label)


def _rot(points, heading):
    c, s = np.cos(heading), np.sin(heading)
    return points @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])


#: Largest scene radius in metres (a street's objects are laid out in steps of
#: metres, so a huge radius would mean billions of them).
MAX_RANGE = 1000.0
#: Largest LiDAR beam and azimuth-step counts of a generated scan.
MAX_BEAMS = 1024
MAX_AZIMUTH_STEPS = 65536
#: Largest ray count (beams x azimuth_steps) of a generated scan: 64 beams of
#: MAX_AZIMUTH_STEPS (the two largest alone, 67 million rays, took the ray
#: casting to gigabytes per array).
MAX_RAYS = 64 * MAX_AZIMUTH_STEPS


def _is_number(value) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_density(density) -> None:
    if not (_is_number(density) and 0 < density <= 100000):
        raise ValueError(f"density must be in (0, 100000] points per square metre; got {density!r}")


#: ``outdoor_scene``'s default ``max_range`` (metres).
DEFAULT_RANGE = 50.0


def _check_scene_args(**values) -> None:
    """The outdoor scene's (and ray fan's) arguments among ``values``;
    ``range_noise`` against the ``max_range`` given (or the default)."""
    limits = {"beams": (1, MAX_BEAMS), "azimuth_steps": (1, MAX_AZIMUTH_STEPS)}
    for name in sorted(values, key=lambda n: n != "max_range"):  # (max_range first: range_noise's bound)
        value = values[name]
        if name in limits:
            lo, hi = limits[name]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}]; got {value!r}")
        elif name == "max_range":
            if not (_is_number(value) and 0 < value <= MAX_RANGE):
                raise ValueError(f"max_range must be in (0, {MAX_RANGE:g}] metres; got {value!r}")
        elif name == "range_noise":
            # (A sigma past the scan's range put returns behind the sensor and 1e38 made the points inf, blamed
            # on xyz.)
            top = values.get("max_range", DEFAULT_RANGE)
            if not (_is_number(value) and np.isfinite(value) and 0 <= value <= top):
                raise ValueError(f"range_noise must be a finite number in [0, max_range] metres ([0, {top:g}] "
                                 f"here); got {value!r}")
        elif not (_is_number(value) and np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    if "beams" in values and "azimuth_steps" in values:  # (each in range: their product before any ray is made)
        rays = int(values["beams"]) * int(values["azimuth_steps"])
        if rays > MAX_RAYS:
            raise ValueError(f"beams x azimuth_steps = {values['beams']} x {values['azimuth_steps']} = {rays:,} rays; "
                             f"a scan may have at most {MAX_RAYS:,} (e.g. 64 x {MAX_AZIMUTH_STEPS})")


@dataclass(frozen=True)
class _Street:
    """A street's layout in its own frame (x along the road), turned by
    ``heading`` (a multiple of 90 degrees, so boxes stay axis-aligned)."""

    heading: float
    road_half: float
    walk: float
    curb: float
    max_range: float

    def turn(self, points) -> np.ndarray:
        """Street-frame points in the scan frame."""
        return _rot(np.asarray(points), -self.heading)


class _Boxes:
    """Axis-aligned boxes collected in the street frame (bounds in the scan frame)."""

    def __init__(self, street: _Street):
        self.street, self.lo, self.hi, self.labels = street, [], [], []

    def add(self, x0, x1, y0, y1, z0, z1, label) -> None:
        corners = self.street.turn([[x0, y0, z0], [x1, y0, z0], [x0, y1, z0], [x1, y1, z0]])
        self.lo.append([corners[:, 0].min(), corners[:, 1].min(), z0])
        self.hi.append([corners[:, 0].max(), corners[:, 1].max(), z1])
        self.labels.append(label)


# The scanning car's footprint about its sensor, street frame (metres: half
# its length and half its width, each with a gap): no parked car stands there.
EGO_HALF_LENGTH, EGO_HALF_WIDTH = 3.0, 1.4


def _buildings_and_parked_cars(rng, st: _Street, boxes: _Boxes, side: int, sensor_y: float) -> None:
    front = st.road_half + st.walk + rng.uniform(0.0, 4.0)
    x = -st.max_range
    while x < st.max_range:
        length = rng.uniform(8, 25)
        if rng.random() < 0.8:
            depth, height = rng.uniform(6, 15), rng.uniform(5, 20)
            y0 = front + rng.uniform(0, 1.5)
            boxes.add(x, x + length, *(sorted((side * y0, side * (y0 + depth)))), 0.0, height, _O["building"])
        x += length + rng.uniform(0, 6)
    # Parked cars along the curb, none where the scanning car drives (the same
    # draws either way, so that the rest of the street stays as it was: a car
    # over the sensor made half a scan "car" from the inside).
    x = -st.max_range + rng.uniform(0, 8)
    while x < st.max_range:
        if rng.random() < 0.4:
            cl, cw, ch = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.95), rng.uniform(1.4, 1.7)
            y0 = st.road_half - cw - rng.uniform(0.1, 0.4)
            ylo, yhi = sorted((side * y0, side * (y0 + cw)))
            if _clear_of_ego(x, x + cl, ylo, yhi, sensor_y):
                boxes.add(x, x + cl, ylo, yhi, 0.15, ch, _O["car"])
                boxes.add(x + 0.25 * cl, x + 0.75 * cl, *(sorted((side * (y0 + 0.1), side * (y0 + cw - 0.1)))),
                          ch, ch + 0.45, _O["car"])
        x += rng.uniform(5.5, 12)


def _clear_of_ego(x0, x1, y0, y1, sensor_y) -> bool:
    """Whether a street-frame footprint keeps off the scanning car's."""
    return (x0 >= EGO_HALF_LENGTH or x1 <= -EGO_HALF_LENGTH or y0 >= sensor_y + EGO_HALF_WIDTH
            or y1 <= sensor_y - EGO_HALF_WIDTH)


def _traffic_and_people(rng, st: _Street, boxes: _Boxes, sensor_y: float) -> None:
    """Driving cars in the lanes (none over the scanning car: the same draws
    either way), people on the sidewalks."""
    for _ in range(rng.integers(0, 4)):
        x = rng.uniform(-st.max_range, st.max_range)
        if abs(x) < 6:
            continue
        lane = rng.uniform(-st.road_half + 2.5, st.road_half - 2.5)
        if not _clear_of_ego(x, x + 4.5, lane - 0.9, lane + 0.9, sensor_y):
            continue
        boxes.add(x, x + 4.5, lane - 0.9, lane + 0.9, 0.15, 1.5, _O["car"])
        boxes.add(x + 1.2, x + 3.4, lane - 0.8, lane + 0.8, 1.5, 1.95, _O["car"])
    for _ in range(rng.integers(2, 9)):
        side = rng.choice([-1, 1])
        x = rng.uniform(-st.max_range * 0.6, st.max_range * 0.6)
        y = side * (st.road_half + rng.uniform(0.3, st.walk - 0.3))
        h = rng.uniform(1.55, 1.9)
        boxes.add(x - 0.2, x + 0.2, y - 0.25, y + 0.25, st.curb, st.curb + h * 0.87, _O["person"])
        boxes.add(x - 0.12, x + 0.12, y - 0.12, y + 0.12, st.curb + h * 0.87, st.curb + h, _O["person"])


def _poles_and_trees(rng, st: _Street, side: int, poles, trunks, crowns) -> None:
    """Poles and tree trunks (with their crowns: centre, radius) along one side."""
    x = -st.max_range + rng.uniform(0, 10)
    while x < st.max_range:
        poles.append((x, side * (st.road_half + rng.uniform(0.3, 0.8))))
        x += rng.uniform(12, 30)
    x = -st.max_range + rng.uniform(0, 6)
    while x < st.max_range:
        if rng.random() < 0.6:
            y = side * (st.road_half + st.walk * rng.uniform(0.4, 0.9))
            h = rng.uniform(2.0, 3.5)
            trunks.append((x, y, rng.uniform(0.12, 0.3), h))
            r = rng.uniform(1.5, 3.0)
            crowns.append(((x, y, h + r * 0.7), r))
        x += rng.uniform(6, 14)


def _cast_roadside(rng, st: _Street, caster: _Caster) -> None:
    """Poles, trunks, tree crowns and bushes, cast into ``caster``."""
    poles, trunks, crowns = [], [], []
    for side in (-1, 1):
        _poles_and_trees(rng, st, side, poles, trunks, crowns)
    bushes = []
    for _ in range(rng.integers(5, 20)):
        side = rng.choice([-1, 1])
        x = rng.uniform(-st.max_range, st.max_range)
        y = side * (st.road_half + st.walk + rng.uniform(0.5, 3.5))
        r = rng.uniform(0.5, 1.3)
        bushes.append(((x, y, r * 0.5), r))
    if poles:
        p = st.turn([[x, y, 0.0] for x, y in poles])[:, :2]
        caster.cylinders(p, rng.uniform(0.06, 0.15, len(p)), np.zeros(len(p)), rng.uniform(4, 9, len(p)), _O["pole"])
    if trunks:
        tr = np.array(trunks)
        p = st.turn(np.c_[tr[:, :2], np.zeros(len(tr))])[:, :2]
        caster.cylinders(p, tr[:, 2], np.zeros(len(tr)), tr[:, 3] + 0.5, _O["trunk"])
    veg = crowns + bushes
    if veg:
        caster.spheres(st.turn([c for c, _ in veg]), np.array([r for _, r in veg]), _O["vegetation"], 0.6, rng)


def _returns(rng, caster: _Caster, range_noise: float, seed: int) -> Sample:
    """The hits as a LiDAR reports them: noisy ranges, points relative to the
    sensor, an intensity per class with noise."""
    hit = caster.label >= 0
    t = caster.t[hit] + rng.normal(0, range_noise, int(hit.sum()))
    xyz = caster.o + caster.d[hit] * t[:, None]
    labels = caster.label[hit]
    base = np.array([_INTENSITY[c] for c in OUTDOOR_CLASSES])[labels]
    intensity = np.clip(base + rng.normal(0, 0.12, len(labels)), 0, 1)
    xyz = xyz - np.array([caster.o[0], caster.o[1], caster.o[2]])
    return Sample(xyz.astype(np.float32), labels.astype(np.int64), intensity=intensity.astype(np.float32)[:, None],
                  name=f"generated-outdoor-{seed}")


def outdoor_scene(seed: int = 0, beams: int = 64, azimuth_steps: int = 1024, max_range: float = DEFAULT_RANGE,
                  range_noise: float = 0.02) -> Sample:
    """A street scanned by a 64-beam LiDAR 1.73 m above the road.

    Classes (:data:`OUTDOOR_CLASSES`): road, sidewalk (raised by a curb),
    terrain, building facades with gaps, vegetation crowns over trunks and
    bushes, poles, parked and driving cars, people. Features: intensity.
    Every point is labelled; ``labels`` index :data:`OUTDOOR_CLASSES`.
    Limits (checked first): ``seed`` an int >= 0, ``beams`` 1..1024,
    ``azimuth_steps`` 1..65536, at most :data:`MAX_RAYS` rays in all, ``max_range`` in (0, MAX_RANGE] metres,
    ``range_noise`` (the sigma of the noise on each range, metres) finite
    in [0, max_range] (numbers, not bools)."""
    # (None drew a different scene each call; numpy's errors did not name it, nor took a 0-d tensor as_int takes)
    seed = as_int(seed, "seed", 0)
    _check_scene_args(beams=beams, azimuth_steps=azimuth_steps, max_range=max_range, range_noise=range_noise)
    rng = np.random.default_rng(seed)
    # The street is laid out in its own frame and turned by a multiple of 90
    # degrees; training turns the whole cloud by any angle anyway.
    heading = rng.integers(4) * np.pi / 2
    st = _Street(heading, rng.uniform(3.0, 6.5), rng.uniform(1.5, 3.5), rng.uniform(0.1, 0.2), max_range)
    sensor_y = rng.uniform(-0.5, 0.5) * st.road_half
    sensor = st.turn(np.array([[0.0, sensor_y, 1.73]]))[0]
    caster = _Caster(sensor, lidar_rays(beams, azimuth_steps), max_range)
    caster.ground(st.road_half, st.walk, st.curb, heading)
    boxes = _Boxes(st)
    for side in (-1, 1):
        _buildings_and_parked_cars(rng, st, boxes, side, sensor_y)
    _traffic_and_people(rng, st, boxes, sensor_y)
    caster.boxes(np.array(boxes.lo), np.array(boxes.hi), np.array(boxes.labels))
    _cast_roadside(rng, st, caster)
    return _returns(rng, caster, range_noise, seed)


def _sample_box_surface(rng, lo, hi, density, faces=("top", "bottom", "sides")):
    """Points on the faces of an axis-aligned box, ``density`` per m^2."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    size = hi - lo
    out = []
    for axis in range(3):
        for end in (0, 1):
            name = "sides" if axis < 2 else ("top" if end else "bottom")
            if name not in faces:
                continue
            u, v = [a for a in range(3) if a != axis]
            n = rng.poisson(density * size[u] * size[v])
            p = lo + rng.random((n, 3)) * size
            p[:, axis] = hi[axis] if end else lo[axis]
            out.append(p)
    return np.concatenate(out) if out else np.zeros((0, 3))


def _shelf(rng, w, d, density) -> np.ndarray:
    """A shelf against a wall: its box and its boards every 0.4 m."""
    sw, sd, sh = rng.uniform(0.8, 2.0), rng.uniform(0.3, 0.5), rng.uniform(1.2, 2.2)
    if rng.random() < 0.5:
        x0, y0 = rng.uniform(0, w - sw), rng.choice([0.02, d - sd - 0.02])
        lo, hi = (x0, y0, 0), (x0 + sw, y0 + sd, sh)
    else:
        x0, y0 = rng.choice([0.02, w - sd - 0.02]), rng.uniform(0, d - sw)
        lo, hi = (x0, y0, 0), (x0 + sd, y0 + sw, sh)
    pts = [_sample_box_surface(rng, lo, hi, density)]
    for z in np.arange(0.4, sh - 0.1, 0.4):
        pts.append(_sample_box_surface(rng, (lo[0], lo[1], z), (hi[0], hi[1], z + 0.02), density, ("top",)))
    return np.concatenate(pts)


def _legs(rng, x0, y0, width, depth, leg, height, density) -> list:
    """Four square legs of side ``leg`` at the corners of a top."""
    corners = ((x0, y0), (x0 + width - leg, y0), (x0, y0 + depth - leg), (x0 + width - leg, y0 + depth - leg))
    return [_sample_box_surface(rng, (lx, ly, 0), (lx + leg, ly + leg, height), density, ("sides",))
            for lx, ly in corners]


def _chair(rng, x0, y0, tw, td, density) -> np.ndarray:
    """A chair on one side of the table at (x0, y0) of size (tw, td), its
    backrest on the side away from the table."""
    side = rng.integers(4)
    cx = x0 + rng.uniform(0.2, tw - 0.2) if side < 2 else (x0 - 0.55 if side == 2 else x0 + tw + 0.1)
    cy = (y0 - 0.55 if side == 0 else y0 + td + 0.1) if side < 2 else y0 + rng.uniform(0.2, td - 0.2)
    s = seat = 0.45
    pts = [_sample_box_surface(rng, (cx, cy, seat - 0.04), (cx + s, cy + s, seat), density)]
    pts += _legs(rng, cx, cy, s, s, 0.04, seat - 0.04, density)
    back = {0: ((cx, cy, seat), (cx + s, cy + 0.04, seat + 0.45)),
            1: ((cx, cy + s - 0.04, seat), (cx + s, cy + s, seat + 0.45)),
            2: ((cx, cy, seat), (cx + 0.04, cy + s, seat + 0.45))}.get(
        int(side), ((cx + s - 0.04, cy, seat), (cx + s, cy + s, seat + 0.45)))
    pts.append(_sample_box_surface(rng, *back, density))
    return np.concatenate(pts)


def _table_with_chairs(rng, w, d, density, add) -> None:
    tw, td, th = rng.uniform(0.8, 2.0), rng.uniform(0.6, 1.2), rng.uniform(0.7, 0.78)
    x0, y0 = rng.uniform(1.0, max(1.1, w - tw - 1.0)), rng.uniform(1.0, max(1.1, d - td - 1.0))
    pts = [_sample_box_surface(rng, (x0, y0, th - 0.04), (x0 + tw, y0 + td, th), density)]
    pts += _legs(rng, x0, y0, tw, td, 0.06, th - 0.04, density)
    add(np.concatenate(pts), _I["table"])
    for _ in range(rng.integers(1, 5)):
        add(_chair(rng, x0, y0, tw, td, density), _I["chair"])


def indoor_scene(seed: int = 0, density: float = 400.0) -> Sample:
    """A furnished room sampled on its surfaces (like a fused RGB-D scan).

    Classes (:data:`INDOOR_CLASSES`): floor, wall, ceiling, table, chair,
    shelf. Features: RGB colour in 0..1 (one colour per object, noisy).
    ``density`` (points per square metre) is in (0, 100000]; ``seed`` an
    int >= 0."""
    # (None drew a different scene each call; numpy's errors did not name it, nor took a 0-d tensor as_int takes)
    seed = as_int(seed, "seed", 0)
    _check_density(density)
    rng = np.random.default_rng(seed)
    w, d, h = rng.uniform(4, 9), rng.uniform(4, 8), rng.uniform(2.5, 3.2)
    parts = []  # (points, label, colour)

    def add(points, label):
        parts.append((points, label, rng.random(3)))

    add(_sample_box_surface(rng, (0, 0, 0), (w, d, 0), density, ("top",)), _I["floor"])
    add(_sample_box_surface(rng, (0, 0, h), (w, d, h), density * 0.5, ("bottom",)), _I["ceiling"])
    add(_sample_box_surface(rng, (0, 0, 0), (w, d, h), density * 0.6, ("sides",)), _I["wall"])
    for _ in range(rng.integers(1, 4)):
        add(_shelf(rng, w, d, density), _I["shelf"])
    for _ in range(rng.integers(1, 4)):
        _table_with_chairs(rng, w, d, density, add)
    xyz = np.concatenate([p for p, _, _ in parts])
    labels = np.concatenate([np.full(len(p), lab) for p, lab, _ in parts])
    rgb = np.concatenate([np.broadcast_to(c, (len(p), 3)) for p, _, c in parts])
    xyz = xyz + rng.normal(0, 0.005, xyz.shape)
    rgb = np.clip(rgb + rng.normal(0, 0.05, rgb.shape), 0, 1)
    return Sample(xyz.astype(np.float32), labels.astype(np.int64), rgb=rgb.astype(np.float32),
                  name=f"generated-indoor-{seed}")
