"""Speech and video samples as arrays: decoding, streamed and cut, and the pre-flight checks.

- Audio (wav, flac, ogg, mp3, or any container with an audio track): :func:`audio_blocks` yields
  mono float32 blocks at the encoder's rate, ``block_seconds`` at a time, and stops after
  ``max_seconds``, so a long file never sits in memory whole: at most one block of the file's
  own samples and the resampler's small state. Decoded with soundfile (libsndfile), else PyAV
  (FFmpeg) where libsndfile cannot read the file; resampled by soxr's streaming resampler (the
  soundfile path) or FFmpeg's (the PyAV path).
- Video (mp4, webm, avi, mkv): :func:`video_frames` decodes the first video stream with PyAV and
  keeps one frame each ``1 / fps`` seconds, at most ``max_frames`` of them and none after
  ``max_seconds``, each resized at once (so memory is ``max_frames`` small images, whatever the
  clip's length or resolution).
- :func:`media_problems`: what is wrong with each row's file before any stage (missing, not
  decodable, not of the kind, empty, silent), for the pool reader's pre-flight.

A source is an absolute path (str) or the encoded file's bytes. Every failure is a
:class:`BadMedia` saying what was wrong.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import InputError

SILENCE_PEAK = 1e-3  # a recording whose peak |amplitude| stays below -60 dBFS is silent
BLOCK_SECONDS = 10.0


class BadMedia(InputError):
    """An audio or video file that cannot be used: its ``reason`` is a short phrase (``"silent
    audio"``) the pool reader counts rows by."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def _where(source) -> str:
    return f"audio/video bytes ({len(source)} B)" if isinstance(source, bytes) else repr(source)


def _open(source):
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _av_errors() -> tuple:
    import av

    return (av.error.FFmpegError, OSError, ValueError, IndexError)


def audio_blocks(source, rate: Optional[int], max_seconds: float,
                 block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Mono float32 blocks of ``source`` resampled to ``rate`` Hz (None: the file's own rate), the
    first ``max_seconds`` of it only; an empty or undecodable file raises :class:`BadMedia`.

    Example:
        >>> import soundfile as sf, tempfile
        >>> f = tempfile.NamedTemporaryFile(suffix=".wav").name
        >>> sf.write(f, np.sin(np.arange(8000 * 3) / 5).astype(np.float32), 8000)
        >>> blocks = list(audio_blocks(f, 16000, 2.5, block_seconds=1.0))  # 1 s of the file at a time
        >>> len(blocks), sum(len(b) for b in blocks)  # the resampler's delay shifts the cuts
        (3, 40000)
    """
    import soundfile as sf

    try:
        f = sf.SoundFile(_open(source))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        yield from _av_audio_blocks(source, rate, max_seconds, block_seconds)
        return
    with f:
        if f.frames == 0:
            raise BadMedia("empty audio", f"{_where(source)} holds no samples")
        own = f.samplerate
        total = int(min(f.frames, round(max_seconds * own)))
        stream = None
        if rate is not None and rate != own:
            import soxr

            stream = soxr.ResampleStream(own, rate, 1, dtype="float32")
        step = max(1, int(block_seconds * own))
        done = 0
        try:
            while done < total:
                x = f.read(min(step, total - done), dtype="float32", always_2d=True)
                if len(x) == 0:
                    break
                done += len(x)
                x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
                last = done >= total
                yield np.ascontiguousarray(stream.resample_chunk(x, last=last) if stream else x)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise BadMedia("unreadable audio", f"{_where(source)}: {e}") from None
        if done == 0:
            raise BadMedia("empty audio", f"{_where(source)} holds no samples")


def _av_audio_blocks(source, rate, max_seconds, block_seconds) -> Iterator[np.ndarray]:
    """:func:`audio_blocks` through PyAV (FFmpeg): mp3 where libsndfile is older, audio tracks of
    video containers. FFmpeg's resampler converts to mono float at ``rate``."""
    import av

    try:
        container = av.open(_open(source))
    except _av_errors() as e:
        raise BadMedia("not an audio file", f"{_where(source)} is neither audio soundfile nor FFmpeg can read "
                       f"({' '.join(str(e).split())[:160]})") from None
    with container:
        if not container.streams.audio:
            raise BadMedia("not an audio file", f"{_where(source)} has no audio stream")
        stream = container.streams.audio[0]
        out_rate = rate or stream.rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=out_rate)
        limit, step = int(round(max_seconds * out_rate)), int(block_seconds * out_rate)
        buf, have, done = [], 0, 0
        try:
            for frame in container.decode(stream):
                for r in resampler.resample(frame):
                    x = r.to_ndarray().reshape(-1).astype(np.float32)
                    buf.append(x)
                    have += len(x)
                while have >= step and done < limit:
                    x = np.concatenate(buf)
                    take = min(step, limit - done)
                    yield x[:take]
                    done += take
                    buf, have = [x[take:]], len(x) - take
                if done >= limit:
                    return
        except _av_errors() as e:
            raise BadMedia("unreadable audio", f"{_where(source)}: {' '.join(str(e).split())[:160]}") from None
        rest = np.concatenate(buf)[: limit - done] if buf else np.zeros(0, np.float32)
        if done == 0 and len(rest) == 0:
            raise BadMedia("empty audio", f"{_where(source)} holds no samples")
        if len(rest):
            yield rest


def load_audio(source, rate: Optional[int], max_seconds: float) -> np.ndarray:
    """The first ``max_seconds`` of ``source``, mono float32 at ``rate`` Hz; silent recordings
    (peak below :data:`SILENCE_PEAK`) raise :class:`BadMedia` like unreadable ones."""
    parts = list(audio_blocks(source, rate, max_seconds))
    wav = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if len(wav) == 0:
        raise BadMedia("empty audio", f"{_where(source)} holds no samples")
    if float(np.abs(wav).max()) < SILENCE_PEAK:
        raise BadMedia("silent audio", f"{_where(source)} never rises above -60 dBFS")
    return wav


def video_frames(source, fps: float, max_frames: int, max_seconds: float, size: int) -> list:
    """Frames of ``source``'s first video stream, one each ``1 / fps`` seconds from its start, at
    most ``max_frames`` and none after ``max_seconds``: a list of RGB ``PIL.Image`` of
    ``size`` x ``size``. A file with no video stream, no frame, or a decoding error raises
    :class:`BadMedia`."""
    import av
    from PIL import Image

    try:
        container = av.open(_open(source))
    except _av_errors() as e:
        raise BadMedia("not a video file", f"{_where(source)} is not a container FFmpeg can read "
                       f"({' '.join(str(e).split())[:160]})") from None
    frames: list = []
    with container:
        if not container.streams.video:
            raise BadMedia("not a video file", f"{_where(source)} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "NONE"  # frame order and bytes independent of threads
        due, start = 0.0, None
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / float(stream.average_rate or 25)
                start = t if start is None else start
                t -= start
                if t > max_seconds:
                    break
                if t + 1e-6 >= due:
                    frames.append(frame.to_image().convert("RGB").resize((size, size), Image.BICUBIC))
                    due += 1.0 / fps
                    if len(frames) >= max_frames:
                        break
        except _av_errors() as e:
            raise BadMedia("unreadable video", f"{_where(source)}: {' '.join(str(e).split())[:160]}") from None
    if not frames:
        raise BadMedia("video without frames", f"{_where(source)} holds no decodable frame")
    return frames


def probe(source, kind: str, max_seconds: float) -> Optional[str]:
    """Why the ``kind`` (``"audio"`` or ``"video"``) file ``source`` cannot be used, or None.
    Audio is decoded at its own rate up to ``max_seconds`` (no resampling), video to its first
    frame: about what one decoding costs without the encoder."""
    if isinstance(source, str) and not Path(source).is_file():
        return f"{kind} file missing"
    try:
        if kind == "audio":
            load_audio(source, None, max_seconds)
        else:
            video_frames(source, 1.0, 1, max_seconds, 8)
    except BadMedia as e:
        return e.reason
    return None


def media_problems(sources: list, kind: str, max_seconds: float) -> tuple[dict[str, list[int]], dict[int, str]]:
    """(reason -> rows, first row -> its file) over a column of sources (None: the row has none).

    Example:
        >>> media_problems([None, "/no/such.wav"], "audio", 30.0)
        ({'audio file missing': [1]}, {1: "'/no/such.wav'"})
    """
    bad: dict[str, list[int]] = {}
    shown: dict[int, str] = {}
    for i, src in enumerate(sources):
        if src is None:
            continue
        reason = probe(src, kind, max_seconds)
        if reason is not None:
            if reason not in bad:
                shown[i] = _where(src)
            bad.setdefault(reason, []).append(i)
    return bad, shown
