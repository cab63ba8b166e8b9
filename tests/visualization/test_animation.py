import stat
import sys

import numpy as np
import pytest
from PIL import Image

from spotocc.visualization import animation
from spotocc.visualization.animation import prediction_frames, save_animation, save_prediction_animation


def _frames(count, height=20, width=30):
    frames = []
    for i in range(count):
        frame = np.full((height, width, 3), 255, dtype=np.uint8)
        frame[:, : (i + 1) * 5] = (200, 30, 30)
        frames.append(frame)
    return frames


def test_gif_has_one_frame_per_image(tmp_path):
    path, count = save_animation(tmp_path / "a.gif", _frames(4), fps=5)
    assert count == 4
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (30, 20)
        assert gif.info["duration"] == 200 and gif.info["loop"] == 0
        gif.seek(2)
        rgb = np.asarray(gif.convert("RGB"))
        assert (rgb[:, :15] == (200, 30, 30)).all() and (rgb[:, 15:] == 255).all()


def test_mp4_streams_raw_frames_to_ffmpeg(tmp_path, monkeypatch):
    # a stand-in ffmpeg that records its arguments and the bytes it receives
    fake = tmp_path / "ffmpeg"
    log = tmp_path / "log"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "data = sys.stdin.buffer.read()\n"
        f"open({str(log)!r}, 'w').write(' '.join(sys.argv[1:]) + '\\n' + str(len(data)))\n"
        "open(sys.argv[-1], 'wb').write(b'mp4')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(animation, "ffmpeg_executable", lambda: str(fake))
    path, count = save_animation(tmp_path / "a.mp4", _frames(3, height=21, width=31), fps=2)
    args, size = log.read_text().splitlines()
    assert count == 3 and path.read_bytes() == b"mp4"
    assert "-s 32x22" in args and "-r 2" in args  # padded to even sizes for yuv420p
    assert int(size) == 3 * 32 * 22 * 3


def test_mp4_without_ffmpeg_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(animation, "ffmpeg_executable", lambda: None)
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        save_animation(tmp_path / "a.mp4", _frames(2))


def test_bad_animation_inputs(tmp_path):
    with pytest.raises(ValueError, match=".gif or .mp4"):
        save_animation(tmp_path / "a.avi", _frames(2))
    with pytest.raises(ValueError, match="frame 1 has shape"):
        save_animation(tmp_path / "a.gif", [_frames(1)[0], _frames(1, height=10)[0]])
    with pytest.raises(ValueError, match="no frames"):
        save_animation(tmp_path / "a.gif", [])


def test_prediction_animation_over_files(tmp_path):
    files = []
    for i in range(3):
        labels = np.zeros((8, 8, 4), dtype=np.uint8)
        labels[i : i + 2, 2:5, 0:2] = 1
        files.append(tmp_path / f"08_00000{i}.npz")
        np.savez_compressed(files[-1], labels=labels)
    frames = list(prediction_frames(files, "semantickitti", view_size=(120, 80)))
    assert len(frames) == 3 and len({f.shape for f in frames}) == 1
    assert not np.array_equal(frames[0], frames[1])  # the car moves
    path, count = save_prediction_animation(tmp_path / "s.gif", files, "semantickitti", view_size=(120, 80))
    with Image.open(path) as gif:
        assert count == 3 and gif.n_frames == 3


def test_mp4_written_by_the_real_ffmpeg_decodes_to_the_frames(tmp_path):
    """imageio-ffmpeg (a dev dependency) brings an ffmpeg binary: encode, decode, compare."""
    import imageio_ffmpeg

    frames = _frames(4, height=24, width=40)
    path, count = save_animation(tmp_path / "a.mp4", frames, fps=4)
    assert count == 4
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    decoded = [np.frombuffer(f, dtype=np.uint8).reshape(24, 40, 3) for f in reader]
    assert meta["size"] == (40, 24) and meta["fps"] == 4 and len(decoded) == 4
    for frame, original in zip(decoded, frames):  # H.264 at crf 18: close, not exact
        assert np.abs(frame.astype(int) - original.astype(int)).mean() < 6
    # the red part grows by 5 columns per frame: columns 16-18 are white in frame 2, red in frame 3
    assert decoded[2][:, 16:19].min() > 200
    assert decoded[3][:, 16:19, 0].min() > 150 and decoded[3][:, 16:19, 1].max() < 90
