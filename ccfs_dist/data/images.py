"""Image decoding and resizing shared by every source: files into uint8 tensors (in-memory sources, the
distilled folder), shard members into tensors (the streamed pool), lossless PNG for the shard writer.

One module, so that the in-memory and the streamed sources decode, convert and crop alike (a sample
has the same pixels whichever way it is read) without importing each other.
"""
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ccfs_dist.errors import DataError
from ccfs_dist.runtime.progress import track

# torchvision's IMG_EXTENSIONS, so sorted-path order equals torchvision ImageFolder order.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PROGRESS_MIN_FILES = 1000  # show a progress bar when decoding at least this many files
PNG_LEVEL = 6              # zlib level of the lossless PNGs written for in-memory sources (shards)


def read_images(paths, mode, size=None, resize=None, desc=None, exact_mode=False,
                hint="set data.image_size to resize and center-crop all images"):
    """Decode image files into a uint8 N x C x size x size tensor, in the order given.

    mode: "RGB" or "L"; with `exact_mode` every file must already be in that mode (else converted).
    resize: None (every image must already be size x size; size None = the first image's, which must be
    square; `hint` says how to resize instead), "crop" (shorter side to size, then center crop, like
    torchvision Resize(size) + CenterCrop(size)) or "stretch" (bilinear to size x size).
    """
    channels = 1 if mode == "L" else 3
    if not paths:
        return torch.empty(0, channels, size or 0, size or 0, dtype=torch.uint8)
    if size is None:
        size = square_side(paths[0], mode, exact_mode, hint)
    out = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)

    def load(path):
        img = open_image(path, mode, exact_mode, hint)
        if resize == "crop":
            img = resize_center_crop(img, size)
        elif resize == "stretch" and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        elif img.size != (size, size):
            raise DataError(f"{path}: image is {img.size[0]}x{img.size[1]}, expected {size}x{size} "
                            f"like {paths[0]}; {hint}")
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())

    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # PIL decodes without holding the GIL
    try:
        bar = track(pool.map(load, paths), total=len(paths), desc=desc or "decoding images",
                    unit="images", main=len(paths) >= PROGRESS_MIN_FILES)
        for i, pixels in enumerate(bar):
            out[i] = pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, stop decoding the remaining files
    return out


def to_8bit(img):
    """16-bit grey images (PIL modes I;16*, and I as PNG and TIFF give them) scaled to 8 bits by the high
    byte (>> 8, as a photo editor converts), not clipped at 255 by PIL's convert (which turns them white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L")
    return img


def open_image(path, mode, exact_mode=False, hint=""):
    from ccfs_dist.runtime.io import regular_file
    regular_file(path, "image")                      # a FIFO named x.png would block the open forever
    try:
        with Image.open(path) as img:
            found = img.mode
            if not exact_mode or found == mode:
                return to_8bit(img).convert(mode)
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e} (replace or delete the file)") from e
    names = {"L": "grey (L)", "RGB": "colour (RGB)"}
    raise DataError(f"{path}: image mode {found}, expected {names.get(mode, mode)} like the data; {hint}")


def square_side(path, mode, exact_mode=False, hint=""):
    """The side of the square image file at `path` (opened as open_image does); a DataError if not square."""
    w, h = open_image(path, mode, exact_mode, hint).size
    if w != h:
        raise DataError(f"{path}: image is {w}x{h}, not square; set data.image_size to resize and center-crop "
                        f"all images")
    return w


def crop_geometry(w, h, size):
    """(resized width, height, crop left, top) of resize_center_crop for a w x h image: the shorter side to
    `size`, then the centred size x size box."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def resize_center_crop(img, size):
    w, h = img.size
    if (w, h) != (size, size):
        new_w, new_h, left, top = crop_geometry(w, h, size)
        img = img.resize((new_w, new_h), Image.BILINEAR)
        img = img.crop((left, top, left + size, top + size))
    return img


def resize_shorter(img, size):
    """The image with its shorter side `size` (bilinear, as resize_center_crop's resize; unchanged when it
    already is): what `ccfs shards --resize` stores, so that reading crops where it would have resized."""
    new_w, new_h, _, _ = crop_geometry(*img.size, size)
    return img if img.size == (new_w, new_h) else img.resize((new_w, new_h), Image.BILINEAR)


def channel_stats(images, chunk=4096):
    """Per-channel mean and (population) std of a uint8 N x C x H x W tensor, in [0, 1] units."""
    c = images.shape[1]
    total, total_sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255.0).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        raise DataError("cannot compute mean/std of an empty training split")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def encode_png(pixels, level=PNG_LEVEL):
    """Lossless PNG bytes of one uint8 C x H x W image (C = 1 or 3)."""
    arr = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8).transpose(1, 2, 0))
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def decode_image(data, mode, shape, what="image"):
    """Decode image bytes to a uint8 C x H x W tensor of `shape`, like the in-memory sources: convert to
    `mode`; when the size differs, resize the shorter side and center-crop (resize_center_crop).

    An 8-bit PNG that already has the wanted colour type and size (what `ccfs shards` writes for digits
    and CIFAR) is decoded by torchvision's libpng binding: the same pixels as PIL, a few times faster.
    """
    size = shape[1]
    if _png_as_is(data, mode, size) and fast_png_decoder() is not None:
        try:
            return fast_png_decoder()(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except Exception:
            pass                                              # let PIL decode it (and name the problem)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = to_8bit(img).convert(mode)
    except Exception as e:
        raise DataError(f"cannot decode {what}: {e}") from e
    if img.size != (size, size):
        img = resize_center_crop(img, size)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.unsqueeze(0) if arr.dim() == 2 else arr.permute(2, 0, 1).contiguous()


def is_jpeg(data):
    """True for bytes that start like a JPEG (SOI marker): what decode="device" hands to decode_jpeg."""
    return data[:3] == b"\xff\xd8\xff"


def decode_jpeg_batch(payloads, mode, size, device):
    """Decode JPEG bytes (a list of 1-D uint8 CPU tensors) on `device` with torchvision's decode_jpeg (nvjpeg
    on CUDA, libjpeg-turbo on the CPU) and bring each to a uint8 C x size x size tensor on `device` with
    decode_image's geometry: shorter side to `size` (bilinear, antialiased like PIL), centre crop.

    Returns a list of tensors. Decoded as RGB (libjpeg's own upsampling and colour conversion, as PIL);
    mode "L" then takes PIL's integer luma (R*19595 + G*38470 + B*7471 + 32768) >> 16 before resizing, as
    PIL's convert("L") does (exact for grey JPEGs). A decode failure raises the decoder's RuntimeError
    (decode_jpeg gives no partial results)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if not payloads:
        return []
    device = torch.device(device)
    if device.type == "cuda":
        # drain the caller's stream first: torchvision's CUDA decoder takes output blocks from the caching
        # allocator and writes them on a stream not ordered after the caller's, so it can overwrite memory
        # that queued kernels still read (pytorch/vision#9606: "draining the caller's stream" avoids it)
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():        # torchvision 0.29 deprecates its decoders, with a warning per call
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
    return [_to_size(img, mode, size) for img in decoded]


def _to_size(img, mode, size):
    """One decoded RGB image in `mode` and at size x size, in decode_image's order: convert, then resize + crop."""
    if mode == "L":
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=img.device)
        img = ((img.to(torch.int32) * weights[:, None, None]).sum(0, keepdim=True) + 32768).div(
            65536, rounding_mode="floor").to(torch.uint8)
    _, h, w = img.shape
    if (w, h) != (size, size):
        new_w, new_h, left, top = crop_geometry(w, h, size)
        # float, not uint8: CUDA's antialiased interpolate takes no uint8, and one kernel keeps CPU and CUDA alike
        x = torch.nn.functional.interpolate(img[None].float(), size=(new_h, new_w), mode="bilinear",
                                            align_corners=False, antialias=True)[0]
        img = x[:, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)
    return img.contiguous()


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_FAST_PNG = []


def fast_png_decoder():
    """torchvision's PNG decoding op (its Python wrapper is deprecated and warns on every call), or None
    when this torchvision lacks it or it disagrees with PIL on a test image."""
    if not _FAST_PNG:
        op = None
        try:
            _load_png_op()
            op = lambda t: torch.ops.image.decode_png(t, 0, False)  # noqa: E731  (mode 0: unchanged)
            probe = np.arange(2 * 3 * 5 * 5, dtype=np.uint8).reshape(2, 3, 5, 5) * 7
            for img in (probe[0], probe[1][:1]):
                png = encode_png(img)
                if not torch.equal(op(torch.frombuffer(bytearray(png), dtype=torch.uint8)), torch.from_numpy(img)):
                    op = None
        except Exception:
            op = None
        _FAST_PNG.append(op)
    return _FAST_PNG[0]


def _load_png_op():
    """Register torch.ops.image: load torchvision's image op library alone (milliseconds) rather than
    `import torchvision.io`, which imports all of torchvision (models, datasets, transforms: about 1 s of CPU)
    in every process that decodes, the loader's fork server included. The package's import is the fallback
    (another build's layout)."""
    import importlib.machinery
    import importlib.util
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:
        finder = importlib.machinery.FileFinder(
            list(spec.submodule_search_locations)[0],
            (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        for name in ("image_stable", "image"):           # torchvision >= 0.29, before
            lib = finder.find_spec(name)
            if lib is not None:
                try:
                    torch.ops.load_library(lib.origin)
                    return
                except OSError:
                    break
    import torchvision.io  # noqa: F401  (registers torch.ops.image)


def _png_as_is(data, mode, size):
    """True for a PNG whose IHDR says size x size, bit depth 8, grey (mode L) or RGB (mode RGB)."""
    if len(data) < 33 or data[:8] != _PNG_MAGIC or data[12:16] != b"IHDR":
        return False
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return w == size and h == size and data[24] == 8 and data[25] == (0 if mode == "L" else 2)
