"""Hand-made recordings and clips for the speech and video tests: real files, written here with
soundfile and PyAV (pans and zooms over the photographs scikit-learn ships), good and bad."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tone(seconds: float, rate: int = 8000, hz: float = 220.0, amp: float = 0.3) -> np.ndarray:
    """A tone whose loudness swells 3 times a second (so the VAD hears it): (n,) float32."""
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * hz * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def write_audio(path: Path, wave: np.ndarray, rate: int = 8000) -> Path:
    import soundfile as sf

    sf.write(str(path), wave, rate)
    return path


def bad_audio_files(d: Path) -> dict[str, Path]:
    """reason (as ``io.media`` names it) -> a file that has that problem."""
    from sklearn.datasets import load_sample_image
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    (d / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    Image.fromarray(load_sample_image("flower.jpg")[:64, :64]).save(d / "picture.png")
    return {"audio file missing": d / "missing.wav",
            "not an audio file": d / "corrupt.wav",
            "empty audio": write_audio(d / "empty.wav", np.zeros(0, np.float32)),
            "silent audio": write_audio(d / "silent.flac", np.zeros(8000, np.float32)),
            "not an audio file ": d / "picture.png"}  # a picture in the audio column (same reason)


def write_clip(path: Path, photo: str = "china.jpg", *, codec: str = "libx264", seconds: float = 3.0,
               fps: int = 10, size: int = 96, motion: str = "pan", audio: bool = False) -> Path:
    """A clip of ``seconds`` over a real photograph: a pan (a window sliding right) or a zoom (a
    window shrinking to the centre), ``size`` x ``size`` pixels, optionally with a tone track."""
    import av
    from sklearn.datasets import load_sample_image

    img = load_sample_image(photo)  # (427, 640, 3) uint8
    h, w = img.shape[:2]
    n = int(seconds * fps)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        rate = 48000 if path.suffix == ".webm" else 16000
        a = out.add_stream("libopus" if path.suffix == ".webm" else "aac", rate=rate) if audio else None
        for i in range(n):
            f = i / max(1, n - 1)
            if motion == "pan":
                x0 = int(f * (w - h))
                crop = img[:, x0:x0 + h]
            else:
                m = int(f * h * 0.35)
                crop = img[m:h - m, (w - h) // 2 + m:(w + h) // 2 - m]
            from PIL import Image

            frame = np.asarray(Image.fromarray(crop).resize((size, size)))
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(s.encode())
        if a is not None:
            wave = tone(seconds, rate)[None, :]
            for lo in range(0, wave.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, lo:lo + 1024]), format="flt",
                                                layout="mono")
                fr.sample_rate = rate
                out.mux(a.encode(fr))
            out.mux(a.encode())
    return path


def zero_frame_clip(path: Path) -> Path:
    """A container with a video stream and no frame in it."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        out.start_encoding()  # the header and trailer, and no packet between them
    return path


def truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` of ``src``'s bytes, as a download cut short leaves a file."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def write_photo_crops(d: Path, per_photo: int, size: int = 96, seed: int = 0) -> list[dict]:
    """Labelled image files for an image pool: ``per_photo`` random crops (some mirrored) of each of
    the two real photographs scikit-learn ships, as JPEG and PNG; rows ``{id, image, photo}``."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    rows = []
    for name in ("china.jpg", "flower.jpg"):
        photo = load_sample_image(name)  # (427, 640, 3)
        for i in range(per_photo):
            side = int(rng.integers(160, 400))
            y, x = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size))
            if i % 2:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            file = f"{name[:-4]}_{i}.{'png' if i % 3 == 0 else 'jpg'}"
            crop.save(d / file)
            rows.append({"id": f"{name[:-4]}-{i}", "image": file, "photo": name[:-4]})
    return rows
