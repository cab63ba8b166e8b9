"""Animations over a sequence of predictions: an animated GIF (Pillow) or an MP4 (ffmpeg).

MP4 frames are piped to the ffmpeg executable of the ``imageio-ffmpeg`` package (or an ``ffmpeg``
on the PATH) one at a time, so any length of sequence fits in memory; GIF frames are kept by Pillow
as palette images (one byte per pixel) until the file is written.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spotocc.visualization.panel import render_prediction_panel
from spotocc.visualization.predictions import load_prediction

ANIMATION_SUFFIXES = (".gif", ".mp4")


def ffmpeg_executable() -> str | None:
    """The ffmpeg of ``imageio-ffmpeg`` if installed, else ``ffmpeg`` on the PATH, else None."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


def save_animation(path: str | Path, frames: Iterable[np.ndarray], *, fps: float = 4.0) -> tuple[Path, int]:
    """Write uint8 ``[H, W, 3]`` frames (all the same size) as ``.gif`` or ``.mp4``; return (path, count)."""
    path = Path(path)
    if path.suffix.lower() not in ANIMATION_SUFFIXES:
        raise ValueError(f"animation file {path}: the name must end in .gif or .mp4")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        return path, _save_gif(path, frames, fps)
    return path, _save_mp4(path, frames, fps)


def _checked(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    shape = None
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame {i}: expected uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        if shape is None:
            shape = frame.shape
        elif frame.shape != shape:
            raise ValueError(
                f"frame {i} has shape {frame.shape}, but frame 0 has {shape}: all frames must match"
            )
        yield frame


def _save_gif(path: Path, frames: Iterable[np.ndarray], fps: float) -> int:
    images = [
        Image.fromarray(f).quantize(colors=256, method=Image.Quantize.MEDIANCUT) for f in _checked(frames)
    ]
    if not images:
        raise ValueError("no frames to write")
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=max(20, round(1000 / fps)),
        loop=0,
        disposal=1,
    )
    return len(images)


def _save_mp4(path: Path, frames: Iterable[np.ndarray], fps: float) -> int:
    exe = ffmpeg_executable()
    if exe is None:
        raise RuntimeError(
            f"cannot write {path}: MP4 needs ffmpeg (pip install imageio-ffmpeg); write a .gif instead"
        )
    iterator = _checked(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no frames to write")
    # H.264 with yuv420p needs even sizes: pad with white
    h, w = first.shape[0] + first.shape[0] % 2, first.shape[1] + first.shape[1] % 2
    command = [
        exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
        "-r", f"{fps:g}", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", str(path),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    count = 0
    try:
        for frame in _chain(first, iterator):
            padded = np.full((h, w, 3), 255, dtype=np.uint8)
            padded[: frame.shape[0], : frame.shape[1]] = frame
            process.stdin.write(padded.tobytes())  # type: ignore[union-attr]
            count += 1
        process.stdin.close()  # type: ignore[union-attr]
    except BrokenPipeError:
        pass
    except BaseException:
        process.kill()
        process.wait()
        raise
    error = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.wait() != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {error.strip()}")
    return count


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def prediction_frames(
    prediction_files: Sequence[str | Path],
    class_set: str,
    *,
    samples: Callable[[str], Mapping[str, Any] | None] | None = None,
    title: str | None = None,
    **panel_options: Any,
) -> Iterator[np.ndarray]:
    """One panel per prediction file (sample id = file stem), with a fixed legend of every class.

    ``samples(sample_id)`` may return the dataset item of a prediction (camera images and ground
    truth are then drawn too) or None. ``panel_options`` go to :func:`render_prediction_panel`.
    """
    count = len(prediction_files)
    for i, file in enumerate(prediction_files):
        file = Path(file)
        sample = samples(file.stem) if samples is not None else None
        frame_title = f"{title} — " if title else ""
        yield render_prediction_panel(
            load_prediction(file),
            class_set=class_set,
            sample=sample,
            sample_id=file.stem,
            title=f"{frame_title}frame {i + 1}/{count}",
            legend="all",
            **panel_options,
        ).image


def save_prediction_animation(
    path: str | Path,
    prediction_files: Sequence[str | Path],
    class_set: str,
    *,
    fps: float = 4.0,
    **options: Any,
) -> tuple[Path, int]:
    """Render :func:`prediction_frames` and write them with :func:`save_animation`."""
    if not prediction_files:
        raise ValueError("no prediction files to animate")
    return save_animation(path, prediction_frames(prediction_files, class_set, **options), fps=fps)
