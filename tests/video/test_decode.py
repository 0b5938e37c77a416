"""The decoder on real files written with PyAV: rotation, variable frame rate, seeking, and one decodability rule
shared by the scan and the loaders."""
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from video.data import ClipSpec, Failure, TrainClips, collate_skipping
from video.decode import check_video, probe, read_clip, scan_video
from video.multiview import MultiViewClips, collate_views
from video.synthetic import write_video

W, H = 64, 48


def quadrants(_: int) -> np.ndarray:
    """A frame whose top-left quadrant is white, the rest black: its corner shows how it was turned."""
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 2, : W // 2] = 255
    return img


def bright_corner(frame: torch.Tensor) -> str:
    """Which quadrant of a (C, H, W) frame is bright: 'tl', 'tr', 'bl' or 'br'."""
    g = frame.float().mean(0)
    h, w = g.shape
    means = {"tl": g[: h // 2, : w // 2], "tr": g[: h // 2, w // 2:], "bl": g[h // 2:, : w // 2],
             "br": g[h // 2:, w // 2:]}
    return max(means, key=lambda k: means[k].mean())


@pytest.mark.parametrize("rotation, corner", [(0, "tl"), (90, "bl"), (-90, "tr"), (180, "br")])
def test_display_rotation_is_applied(tmp_path, rotation, corner):
    # rotation is counter-clockwise (FFmpeg's display matrix): turning the frame by +90 moves its top-left
    # corner to the bottom-left; a phone's "rotate=90" tag (clockwise) is -90 here.
    path = write_video(tmp_path / "r.mp4", width=W, height=H, fps=10, seconds=1, content=quadrants, rotation=rotation)
    info = probe(str(path))
    assert (info.width, info.height) == ((H, W) if rotation in (90, -90) else (W, H))
    clip = read_clip(str(path), 0.0, ClipSpec(frames=3, stride=1, fps=10))
    assert clip.shape == (3, 3, info.height, info.width)  # (T, C, H, W) upright
    assert bright_corner(clip[0]) == corner


def index_frames(i: int) -> np.ndarray:
    """Frame i is a flat grey of level 20 * i: the decoded level tells which frame was picked."""
    return np.full((H, W, 3), 20 * i, np.uint8)


def picked(clip: torch.Tensor) -> list[int]:
    return [round(float(f.float().mean()) / 20) for f in clip]


def test_variable_frame_rate_is_sampled_by_time(tmp_path):
    # Four frames 30 ms apart, a pause, four more, a pause, two more: 10 frames over 1.2 s.
    times = [0.0, 0.03, 0.06, 0.09, 0.5, 0.51, 0.52, 0.53, 1.0, 1.1]
    path = write_video(tmp_path / "vfr.mp4", width=W, height=H, fps=10, times=times, content=index_frames)
    info = probe(str(path))
    assert info.frames == 10 and info.duration == pytest.approx(1.2, abs=0.02)
    # Instants 0, 0.1, ..., 1.1 s: the frame on screen at each (the last one shown at or before it).
    clip = read_clip(str(path), 0.0, ClipSpec(frames=12, stride=1, fps=10))
    assert picked(clip) == [0, 3, 3, 3, 3, 4, 7, 7, 7, 7, 8, 9]
    # A clip starting later seeks instead of decoding from the start, and picks the same frames.
    later = read_clip(str(path), 0.5, ClipSpec(frames=4, stride=2, fps=10))  # 0.5, 0.7, 0.9, 1.1 s
    assert picked(later) == [4, 7, 7, 9]


def test_long_video_seeks_and_short_video_repeats_its_last_frame(tmp_path):
    # 120 frames, a keyframe every 12 (mpeg4's default): the clip at 10 s is read from the keyframe before it.
    path = write_video(tmp_path / "long.mp4", width=W, height=H, fps=10, seconds=12,
                       content=lambda i: index_frames(i % 12))
    clip = read_clip(str(path), 10.0, ClipSpec(frames=4, stride=3, fps=10))  # 10.0, 10.3, 10.6, 10.9 s
    assert picked(clip) == [i % 12 for i in (100, 103, 106, 109)]
    short = write_video(tmp_path / "short.mp4", width=W, height=H, fps=10, seconds=0.5, content=index_frames)
    clip = read_clip(str(short), 0.0, ClipSpec(frames=8, stride=1, fps=10))  # 5 frames, 8 instants
    assert picked(clip) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_frames_are_resized_while_decoding(tmp_path):
    path = write_video(tmp_path / "big.mp4", width=320, height=240, fps=10, seconds=1)
    clip = read_clip(str(path), None, ClipSpec(frames=4, stride=1, fps=10), short_side=60)
    assert clip.shape == (4, 3, 60, 80) and clip.dtype == torch.uint8


def write_jpeg_named_mp4(path: Path) -> Path:
    Image.new("RGB", (W, H), (200, 10, 10)).save(path, format="JPEG")
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def write_truncated(path: Path) -> Path:
    good = write_video(path.with_name("whole.mp4"), width=W, height=H, fps=10, seconds=2)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # mp4 muxers write the index at the end: it is cut off
    return path


BAD_FILES = {
    "jpeg named .mp4": write_jpeg_named_mp4,
    "0-byte": lambda p: (p.write_bytes(b""), p)[1],
    "audio only": write_audio_only,
    "truncated before its index": write_truncated,
    "random bytes": lambda p: (p.write_bytes(np.random.default_rng(0).bytes(4096)), p)[1],
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_scan_and_loaders_refuse_the_same_files(tmp_path, kind):
    path = BAD_FILES[kind](tmp_path / "bad.mp4")
    reason = check_video(str(path))
    assert reason is not None
    spec = ClipSpec(frames=4, stride=1, fps=10)
    train = TrainClips([(str(path), 0)], spec, transform=lambda x: x)
    assert isinstance(train[0], Failure) and train[0].index == 0
    test = MultiViewClips([(str(path), 0)], spec, transform=lambda x: x, clips=2)
    assert isinstance(test[1], Failure)
    # one read-or-skip path: the same reason, and each failed clip counted once against its video, in both loaders
    assert test[1].reason == train[0].reason
    assert collate_skipping([train[0]])["failed"].tolist() == [0]
    assert collate_views([test[0], test[1]])["failed"].tolist() == [0, 0]
    if kind == "jpeg named .mp4":
        assert "still image" in reason


def test_scan_and_loaders_accept_a_webm_without_duration(tmp_path):
    path = write_video(tmp_path / "live.webm", width=W, height=H, fps=10, seconds=1, codec="libvpx-vp9",
                       options={"live": "1"})
    with av.open(str(path)) as container:
        assert container.duration is None  # the header has no duration: it is measured from the packets
    assert check_video(str(path)) is None
    assert probe(str(path)).duration == pytest.approx(1.0, abs=0.05)
    clip = TrainClips([(str(path), 0)], ClipSpec(frames=4, stride=2, fps=10), transform=lambda x: x)[0]
    assert clip["video"].shape == (4, 3, H, W)


def level_frames(i: int) -> np.ndarray:
    """Frame i: its top half a flat grey of level 8 * i (30 frames fit in uint8), its bottom half noise (so each
    frame takes bytes and a cut falls between frames)."""
    img = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
    img[: H // 2] = 8 * i
    return img


def level(frame: torch.Tensor) -> int:
    return round(float(frame[:, : H // 2].float().mean()) / 8)


@pytest.mark.parametrize("keep", [0.5, 0.8, 0.95])
def test_faststart_mp4_cut_at_its_end_is_sampled_inside_its_decodable_part(tmp_path, keep):
    """H.264 with B-frames, index at the start (faststart), the last bytes cut off: the index lists frames whose
    bytes are gone. The duration stops before the first cut frame, and every clip, the last included, decodes
    to the frames that are there (no clip fails at run time, none shows a frame from past the cut)."""
    whole = write_video(tmp_path / "whole.mp4", width=W, height=H, fps=10, seconds=3, codec="libx264",
                        content=level_frames, options={"movflags": "faststart"})
    data = whole.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * keep)])
    assert check_video(str(path)) is None
    info = probe(str(path))
    assert info.truncated and not probe(str(whole)).truncated
    assert info.frames < 30 and info.duration == pytest.approx(info.frames / 10)
    spec = ClipSpec(frames=4, stride=2, fps=10)
    views = MultiViewClips([(str(path), 0)], spec, transform=lambda x: x, clips=5)
    clips = [views[i] for i in range(5)]
    assert not [c for c in clips if isinstance(c, Failure)]
    last = [level(f) for f in clips[-1]["video"]]
    n = info.frames  # the last clip ends at the decodable end: instants n/10 - 0.8 ... n/10 - 0.2 s
    assert last == [n - 8, n - 6, n - 4, n - 2]
    assert scan_video(str(path)) == (None, True) and scan_video(str(whole)) == (None, False)  # the scan lists it
