"""Decode video files with PyAV: one decodability rule, frames picked by presentation time, rotation applied.

Used by ``python -m video.scan`` and by the clip datasets alike, so a file the scan accepts is a file the
run can read and the other way round. A file is **decodable** when (:func:`probe`):

* PyAV opens it and its container is a video container, not a still-image format (a JPEG named ``.mp4``
  opens as ``jpeg_pipe`` and is refused);
* it has a video stream whose packets carry timestamps, and the first frame decodes;
* its duration, measured from the packet timestamps (first to last frame, plus the last frame's
  duration), is positive. Header durations are not trusted: a webm written live has none, and a file
  truncated after its index keeps the header of the whole video.

A file cut short whose index survives (an mp4 written with ``movflags=faststart`` keeps its index at the
start) lists packets whose bytes are gone; the demuxer returns the first of them flagged corrupt. Such a
file is decodable up to its **decodable end**: the decoding time of the first corrupt packet (every packet
after it in decoding order is lost too, and none is shown before that time; a presentation time would not do,
B-frames after it can be shown earlier), or the end of the last whole packet when that is earlier. Its
duration (:attr:`VideoInfo.duration`) stops there, clips are sampled inside it, and the decoder is never
given a corrupt packet, so no clip of it fails at run time for the missing bytes; :attr:`VideoInfo.truncated`
says it was cut (the scan lists such files).

A clip (:func:`read_clip`) is ``frames`` instants ``stride / fps`` seconds apart from ``start``; each instant
takes the frame on screen then (the last frame whose presentation time is at or before it), so variable
frame rate videos are sampled by time, not by frame index; instants past the last frame take the last
frame. Only the frames a clip needs are decoded (seek to the keyframe before the clip, stop after it),
converted to RGB at the target size by libswscale as they are decoded (never at full resolution), then
turned upright by the display rotation the container stores (phones record portrait video as rotated
landscape frames).

Written on PyAV directly because pytorchvideo's ``EncodedVideo`` (0.1.5) decodes every frame of the clip
window at full resolution into float, ignores the display matrix and samples by frame index.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch

# Containers every layout reads (lower-case suffixes); files with other suffixes are reported, not read.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
# FFmpeg demuxers of still images: they "decode" a JPEG or PNG as a one-frame video.
_IMAGE_DEMUXERS = ("image2", "image2pipe")


class UndecodableVideo(Exception):
    """A file that is not a decodable video; ``str(e)`` is the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a video. Times in seconds, relative to its first frame."""

    duration: float  # first frame to the end of the last decodable frame
    frames: int  # whole video packets with a timestamp before the decodable end (= frames for Kinetics' codecs)
    width: int  # as displayed (after rotation)
    height: int
    rotation: int  # counter-clockwise degrees the decoded frames are turned by to display upright
    start_pts: int  # presentation timestamp of the first frame, in the stream's time base
    time_base: Fraction
    truncated: bool = False  # packets past the decodable end are corrupt (bytes cut off): see the module doc
    end_pts: int | None = None  # the decodable end, in the stream's time base


def _open(path: str) -> av.container.InputContainer:
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise UndecodableVideo(f"cannot open ({type(e).__name__}: {e})") from None
    name = container.format.name
    if name in _IMAGE_DEMUXERS or name.endswith("_pipe"):
        container.close()
        raise UndecodableVideo(f"a still image ({name}), not a video")
    if not container.streams.video:
        container.close()
        raise UndecodableVideo("no video stream")
    return container


def _probe_open(container: av.container.InputContainer) -> VideoInfo:
    """Demux every video packet (no decoding but the first frame): timestamps, duration, size, rotation."""
    stream = container.streams.video[0]
    first, start, end = None, None, None
    pts_seen: list[int] = []
    corrupt_from: int | None = None  # earliest presentation time of a corrupt (cut) packet
    last_durations: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                continue  # the flush packet at the end, or a damaged one
            if packet.is_corrupt:
                # Every packet from this one on in decoding order is lost; each shows at or after its decoding
                # time, which is at or after this one's (decoding times only grow): frames before it are whole.
                cut = packet.dts if packet.dts is not None else packet.pts
                corrupt_from = cut if corrupt_from is None else min(corrupt_from, cut)
                continue
            pts_seen.append(packet.pts)
            start = packet.pts if start is None else min(start, packet.pts)
            stop = packet.pts + (packet.duration or 0)
            end = stop if end is None else max(end, stop)
            if packet.duration:
                last_durations = [packet.duration]
            if first is None and corrupt_from is None:
                for frame in packet.decode():
                    first = frame
                    break
    except (av.FFmpegError, OSError, ValueError) as e:
        if not pts_seen:
            raise UndecodableVideo(f"no readable packet ({type(e).__name__}: {e})") from None
        # A file truncated in the middle of a packet: the packets read so far stand.
    if first is None and pts_seen:
        try:
            first = next((f for f in stream.codec_context.decode(None)), None)  # frames held by the decoder
        except (av.FFmpegError, ValueError):
            first = None
    if corrupt_from is not None and start is not None:
        end = min(end, corrupt_from)  # frames shown from the first cut packet on cannot be trusted to decode
    count = sum(start is not None and p < end for p in pts_seen) if pts_seen else 0
    if count == 0:
        raise UndecodableVideo("no video packet with a timestamp" if corrupt_from is None else
                               "truncated: no whole video packet before the cut")
    if first is None:
        raise UndecodableVideo("no decodable frame")
    time_base = stream.time_base or Fraction(1, 1)
    if end == start and not last_durations:  # one frame without a duration: one frame period
        rate = stream.average_rate or stream.guessed_rate
        end = start + (int(round(1 / (rate * time_base))) if rate else 0)
    duration = float((end - start) * time_base)
    if not duration > 0:
        raise UndecodableVideo("unknown or zero duration")
    rotation = int(first.rotation or 0) % 360
    w, h = first.width, first.height
    if rotation in (90, 270):
        w, h = h, w
    return VideoInfo(duration=duration, frames=count, width=w, height=h, rotation=rotation, start_pts=start,
                     time_base=time_base, truncated=corrupt_from is not None, end_pts=end)


def probe(path: str) -> VideoInfo:
    """The decodability rule (see the module doc): a :class:`VideoInfo`, or :class:`UndecodableVideo`."""
    container = _open(path)
    try:
        return _probe_open(container)
    finally:
        container.close()


def check_video(path: str) -> str | None:
    """None when ``path`` is decodable by :func:`probe`, else the reason it is not."""
    return scan_video(path)[0]


def scan_video(path: str) -> tuple[str | None, bool]:
    """(reason ``path`` is not decodable or None, whether it is cut short but decodable up to its decodable end)."""
    try:
        return None, probe(path).truncated
    except UndecodableVideo as e:
        return str(e), False


@dataclass(frozen=True)
class ClipSpec:
    """``frames`` instants ``stride`` frame periods apart at ``fps``: the clip lasts ``frames x stride / fps`` s."""

    frames: int
    stride: int
    fps: float

    @property
    def step(self) -> Fraction:
        """Seconds between two sampled instants."""
        return Fraction(self.stride) / Fraction(self.fps).limit_denominator(1000)

    @property
    def duration(self) -> Fraction:
        return self.frames * self.step

    def instants(self, start: float) -> list[float]:
        return [float(start + k * self.step) for k in range(self.frames)]


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side`` (aspect kept); unchanged when None."""
    if short_side is None:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_array(frame: av.VideoFrame, size: tuple[int, int], rotation: int) -> np.ndarray:
    """Decoded frame -> upright RGB (H, W, 3) uint8 of display size ``size`` (width, height)."""
    w, h = size if rotation not in (90, 270) else size[::-1]  # the coded frame is scaled before it is turned
    rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
    return np.rot90(rgb, k=rotation // 90) if rotation else rgb  # counter-clockwise, as FFmpeg's display matrix


def read_clip(path: str, start: float | Callable[[float], float] | None, spec: ClipSpec, *,
              short_side: int | None = None) -> torch.Tensor:
    """The clip of ``spec`` starting ``start`` seconds after the first frame: (T, C, H, W) uint8.

    ``start`` may be a function of the video's duration (seconds). ``start=None`` draws a start uniformly
    over the video (from torch's generator, which DataLoader seeds per worker; the clip ends at the video's
    end at the latest), as pytorchvideo's ``RandomClipSampler`` does. ``short_side`` resizes the frames
    while decoding. Raises :class:`UndecodableVideo` when the file breaks the rule of :func:`probe` or a
    frame of the clip does not decode.
    """
    container = _open(path)
    try:
        info = _probe_open(container)
        if start is None:
            span = max(info.duration - float(spec.duration), 0.0)
            start = span * float(torch.rand(()))
        elif callable(start):
            start = start(info.duration)
        instants = spec.instants(start)
        frames = _decode_instants(container, info, instants, output_size(info.width, info.height, short_side))
    finally:
        container.close()
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, H, W, C) -> (T, C, H, W)


def _decode_instants(container, info: VideoInfo, instants: list[float], size: tuple[int, int]) -> list[np.ndarray]:
    """The frame on screen at each of ``instants`` (sorted seconds): seek, decode forward, keep what is needed."""
    stream = container.streams.video[0]
    tb = info.time_base
    seek_pts = info.start_pts + int(math.floor(instants[0] / tb))
    picked = _decode_from(container, stream, info, instants, size, seek_pts)
    if picked is None:  # the seek landed after the clip's first instant (a sparse or broken index): read from the start
        picked = _decode_from(container, stream, info, instants, size, None)
    if picked is None:
        raise UndecodableVideo(f"no frame decodes at {instants[0]:.2f}-{instants[-1]:.2f} s")
    return picked


def _decoded_frames(container, stream):
    """Frames from the current position in presentation order. The decoder never gets a corrupt (cut) packet:
    at the first one demuxing stops and the frames the decoder holds are flushed out."""
    for packet in container.demux(stream):
        if packet.is_corrupt and packet.pts is not None:
            break
        yield from packet.decode()  # the empty packet at the end of the file flushes the decoder
    else:
        return
    yield from stream.codec_context.decode(None)


def _decode_from(container, stream, info: VideoInfo, instants: list[float], size: tuple[int, int],
                 seek_pts: int | None) -> list[np.ndarray] | None:
    try:
        container.seek(seek_pts if seek_pts is not None else info.start_pts, stream=stream, backward=True,
                       any_frame=False)
    except (av.FFmpegError, OSError, ValueError):
        if seek_pts is not None:
            return None
    out: list[np.ndarray] = []
    prev, prev_array, k = None, None, 0

    def take(frame) -> np.ndarray:
        nonlocal prev_array
        if prev_array is None:
            prev_array = _to_array(frame, size, info.rotation)
        return prev_array

    try:
        for frame in _decoded_frames(container, stream):
            if frame.pts is None:
                continue
            t = float((frame.pts - info.start_pts) * info.time_base)
            if prev is None and seek_pts is not None and t > instants[0] + 1e-6 and instants[0] > 0:
                return None  # the seek overshot: the frame on screen at the first instant was skipped
            while k < len(instants) and t > instants[k] + 1e-6:
                out.append(take(prev) if prev is not None else _to_array(frame, size, info.rotation))
                k += 1
            if k == len(instants):
                break
            prev, prev_array = frame, None
    except (av.FFmpegError, OSError, ValueError) as e:
        # A damaged packet inside the clip: its instants have no frame, and repeating an earlier one would
        # be a padded clip scored as a real one.
        raise UndecodableVideo(f"decoding fails inside the clip ({type(e).__name__}: {e})") from None
    if prev is None and not out:
        return None
    while k < len(instants):  # instants past the last frame show the last frame
        out.append(take(prev))
        k += 1
    return out
