"""One layout for every data source: positions, optional intensity/colour,
per-point labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# The documented range of each per-point feature (the readers' scaling lands in it).
_RANGES = {"intensity": (0.0, 1.5), "rgb": (0.0, 1.0)}
_SCALED = {"intensity": "scaled: 0..1, the brightest returns up to 1.5", "rgb": "scaled from 0..255 or 0..65535"}


@dataclass
class Sample:
    """A labelled point cloud.

    Attributes:
        xyz: float32 ``(N, 3)`` positions in metres (any origin; training
            centres them).
        labels: int64 ``(N,)`` training ids (``ignore_index`` for points that
            count nowhere), or None for unlabelled clouds.
        intensity: optional float32 ``(N, 1)`` return intensity scaled to
            0..1, at most 1.5 (the readers divide raw intensities by their
            99th percentile, so the brightest returns pass 1; they clip at
            1.5).
        rgb: optional float32 ``(N, 3)`` colour in 0..1.
        name: where the sample came from (file name or generator and seed).

    Non-finite positions, intensities or colours, and intensities or
    colours outside those ranges (colour in 0..255 not scaled, a negative
    intensity), are a ValueError naming the field.
    """

    xyz: np.ndarray
    labels: np.ndarray | None = None
    intensity: np.ndarray | None = None
    rgb: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        xyz = np.asarray(self.xyz)
        if xyz.dtype.kind not in "biuf":
            try:
                xyz = xyz.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{self.name or 'sample'}: xyz must hold numbers ({exc})") from None
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise ValueError(f"{self.name or 'sample'}: xyz must be (N, 3); got {xyz.shape}")
        self.xyz = np.ascontiguousarray(xyz, dtype=np.float32)
        n = len(self.xyz)
        bad = int((~np.isfinite(self.xyz)).any(1).sum())
        if bad:
            raise ValueError(f"{self.name or 'sample'}: xyz holds NaN or inf at {bad} of {n} points")
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.shape != (n,):
                raise ValueError(f"{self.name or 'sample'}: labels must be ({n},); got {labels.shape}")
            if not np.issubdtype(labels.dtype, np.integer):
                raise TypeError(f"{self.name or 'sample'}: labels must be integers; got {labels.dtype}")
            if labels.dtype == np.uint64 and n and int(labels.max()) > np.iinfo(np.int64).max:
                # (cast as they were, they wrapped round to negative ids)
                raise ValueError(f"{self.name or 'sample'}: labels must fit int64; got {int(labels.max())}")
            self.labels = labels.astype(np.int64)
        for field, width in (("intensity", 1), ("rgb", 3)):
            value = getattr(self, field)
            if value is None:
                continue
            try:
                value = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{self.name or 'sample'}: {field} must hold numbers ({exc})") from None
            if value.ndim == 1:
                value = value[:, None]
            if value.shape != (n, width):
                raise ValueError(f"{self.name or 'sample'}: {field} must be ({n}, {width}); got {value.shape}")
            bad = int((~np.isfinite(value)).any(1).sum())
            if bad:
                raise ValueError(f"{self.name or 'sample'}: {field} holds NaN or inf at {bad} of {n} points")
            low, high = _RANGES[field]
            outside = ((value < low) | (value > high)).any(1)
            if outside.any():
                raise ValueError(f"{self.name or 'sample'}: {field} must lie in {low}..{high} ({_SCALED[field]}); "
                                 f"{int(outside.sum())} of {n} points do not (values {float(value.min())!r} to "
                                 f"{float(value.max())!r})")
            setattr(self, field, value)

    def __len__(self) -> int:
        return len(self.xyz)

    def subset(self, mask) -> "Sample":
        """The points selected by a boolean mask or index array."""
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return Sample(self.xyz[mask], pick(self.labels), pick(self.intensity), pick(self.rgb), self.name)
