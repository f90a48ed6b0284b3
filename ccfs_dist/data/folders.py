"""Image-file sources on disk: the files and labels of a Tiny-ImageNet or image-folder source in their
canonical order (torchvision ImageFolder order), without decoding anything; ImageNet's flat validation folder
with its labels file; symlinks resolved or refused; the test split disjoint from the training split; where a
source lies (`image_places`: what no output may overlap).
"""
import errno
import os

from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.data.images import IMG_EXTENSIONS
from ccfs_dist.runtime.io import regular_file

def image_files(source, root, split="train"):
    """(paths, labels, classes) of a file-based source ('tiny-imagenet' or 'imagefolder') in its canonical
    order (the global index of the train split), without decoding anything."""
    if source == "tiny-imagenet":
        classes, train, test = tiny_imagenet_files(root)
    elif source == "imagefolder":
        classes, train, test = imagefolder_files(root)
    else:
        raise ConfigError(f"data source '{source}' is not file-based (tiny-imagenet or imagefolder)")
    files, labels = train if split == "train" else test
    return files, labels, classes


def tiny_imagenet_files(root):
    """(classes, (train files, labels), (test files, labels)) of Tiny-ImageNet-200 at `root` (or its
    tiny-imagenet-200/ sub-folder): train/ in ImageFolder order, val/ labelled by val_annotations.txt."""
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "tiny-imagenet-200")):
        root = os.path.join(root, "tiny-imagenet-200")
    classes, train_files, train_labels = _scan_image_folder(os.path.join(root, "train"))
    wnids_path = os.path.join(root, "wnids.txt")
    if os.path.exists(wnids_path):
        with open(regular_file(wnids_path, "Tiny-ImageNet class list")) as f:
            wnids = sorted(line.strip() for line in f if line.strip())
        _check_same_classes(wnids, classes, wnids_path, os.path.join(root, "train"))

    val_dir = os.path.join(root, "val")
    ann_path = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isfile(ann_path):
        raise DataError(f"Tiny-ImageNet validation labels not found: {ann_path} "
                        f"(expected val/images/*.JPEG and val/val_annotations.txt)")
    index = {c: i for i, c in enumerate(classes)}
    val = {}
    with open(regular_file(ann_path, "Tiny-ImageNet validation labels")) as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{ann_path} line {n}: expected 'filename<TAB>wnid' with a wnid "
                                f"from train/, got {line.strip()!r}")
            val[fields[0]] = index[fields[1]]
    test_files = [os.path.join(val_dir, "images", name) for name in sorted(val)]
    missing = [p for p in test_files if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} files listed in {ann_path} are missing, e.g. {missing[0]}")
    test_labels = [val[name] for name in sorted(val)]
    return classes, (train_files, train_labels), (test_files, test_labels)


def imagefolder_files(root):
    """(classes, (train files, labels), (test files, labels)) of an image folder: train/ and val/ (or test/), one
    sub-folder per class or a flat validation folder with its labels file; the two splits share no file."""
    test_dir = os.path.join(root, "val")
    if not os.path.isdir(test_dir):
        test_dir = os.path.join(root, "test")
    if not os.path.isdir(test_dir):
        raise DataError(f"no test split in {root}: expected a 'val' (or 'test') folder with one "
                        f"sub-folder per class next to 'train'")
    train_dir = os.path.join(root, "train")
    if os.path.realpath(test_dir) == os.path.realpath(train_dir):
        raise DataError(f"the test split {test_dir} is the training folder {train_dir}; the test split must hold "
                        f"other images")
    train_links, test_links = [], []
    classes, train_files, train_labels = _scan_image_folder(train_dir, train_links)
    if _is_flat(test_dir):
        _entries(test_dir, test_links)                      # its symlinks resolved, broken ones refused
        test_files, test_labels = _flat_val(root, test_dir, classes)
    else:
        test_classes, test_files, test_labels = _scan_image_folder(test_dir, test_links)
        _check_same_classes(test_classes, classes, test_dir, train_dir)
    _check_disjoint(train_files + train_links, test_files + test_links, train_dir, test_dir)
    return classes, (train_files, train_labels), (test_files, test_labels)


# ImageNet's validation set as released is one flat folder; its labels come from one of these files
FLAT_VAL_LABELS = ("LOC_val_solution.csv", "val_labels.txt")
MAX_LABEL_FILE_BYTES = 64 << 20


def _is_flat(folder):
    """True when `folder` holds images but no sub-folders (ImageNet's validation set as released)."""
    entries = list(os.scandir(folder))
    return not any(e.is_dir() for e in entries) and any(e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)


def _flat_val(root, folder, classes):
    """(files, labels) of a flat validation folder, sorted by file name, labelled by a ground-truth file:
    Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, the wnid first in the string) or val_labels.txt
    (`<file name or stem> <wnid>` per line), in `folder` or `root`."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_EXTENSIONS) and not n.startswith("."))
    found = [os.path.join(where, n) for n in FLAT_VAL_LABELS for where in (folder, root)
             if os.path.isfile(os.path.join(where, n))]
    if not found:
        raise DataError(f"{folder} holds {len(names)} images and no class sub-folders (ImageNet's flat validation "
                        f"set?): put its ground truth beside it as {' or '.join(FLAT_VAL_LABELS)} ('<file> <wnid>' "
                        f"per line), or sort the images into one sub-folder per class (docs/data.md)")
    path = found[0]
    if os.path.getsize(path) > MAX_LABEL_FILE_BYTES:
        raise DataError(f"{path}: {os.path.getsize(path):,} bytes, more than a ground-truth file holds")
    wnid_of = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields or (n == 1 and fields[0] == "ImageId"):
                continue
            if len(fields) < 2:
                raise DataError(f"{path} line {n}: expected '<file> <wnid>', found {line.strip()[:80]!r}")
            wnid_of[os.path.splitext(fields[0])[0]] = fields[1]
    label_of = {c: i for i, c in enumerate(classes)}
    labels = []
    for name in names:
        wnid = wnid_of.get(os.path.splitext(name)[0])
        if wnid is None:
            raise DataError(f"{os.path.join(folder, name)} has no line in {path}")
        if wnid not in label_of:
            raise DataError(f"{path}: {name} is labelled {wnid!r}, which is not a class of the train split")
        labels.append(label_of[wnid])
    return [os.path.join(folder, n) for n in names], labels


def _scan_image_folder(folder, places=None):
    """(classes, files, labels) in torchvision ImageFolder order: classes sorted, then sorted walk (symlinked
    folders followed). A broken symlink, a symlink loop or an image name that is not a regular file (a FIFO,
    a device: opening it would block) is a DataError naming it, never skipped or followed forever.
    `places`: a list that gets the resolved target of every symlink met (ownership checks: io.check_outputs)."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder} (expected one sub-folder per class)")
    places = [] if places is None else places
    entries = _entries(folder, places)
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise DataError(f"no class sub-folders in {folder}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _walk_images(os.path.join(folder, name), places)
        if not found:
            raise DataError(f"class folder {os.path.join(folder, name)} holds no images "
                            f"(extensions: {' '.join(IMG_EXTENSIONS)})")
        files += found
        labels += [label] * len(found)
    return classes, files, labels


def _entries(folder, places):
    """The entries of `folder`, every symlink among them resolved (its target into `places`) or refused."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror}") from None
    for e in entries:
        if e.is_symlink():
            if not os.path.exists(e.path):
                why = "a symlink loop" if _loops(e.path) else f"a broken symlink (to {os.readlink(e.path)!r})"
                raise DataError(f"{e.path} is {why} in an image folder; remove or fix it")
            places.append(os.path.realpath(e.path))
    return entries


def _loops(path):
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _walk_images(top, places):
    """The image files below `top` in torchvision's order (sorted(os.walk(top, followlinks=True)), names
    sorted), without its endless walk through a symlink that leads back to a folder above it."""
    found, stack = [], [(top, frozenset([os.path.realpath(top)]))]
    while stack:
        folder, above = stack.pop()
        images, subdirs = [], []
        for e in _entries(folder, places):
            if e.is_dir():
                real = os.path.realpath(e.path)
                if real in above:
                    raise DataError(f"{e.path} is a symlink loop in an image folder (it leads back to {real}, "
                                    f"which holds it); remove it")
                subdirs.append((e.path, above | {real}))
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                if not e.is_file():
                    raise DataError(f"{e.path} is not a regular file (a named pipe, device or socket), refused "
                                    f"before it is opened; remove it from the image folder")
                images.append(e.name)
        found.append((folder, sorted(images)))
        stack += subdirs
    return [os.path.join(folder, name) for folder, names in sorted(found) for name in names]


def image_places(source, root):
    """Where the image-file source at `root` lies, symlinks resolved: its split and class folders and the
    targets of the symlinks in it (what no output may overlap)."""
    if source == "tiny-imagenet" and not os.path.isdir(os.path.join(root, "train")) \
            and os.path.isdir(os.path.join(root, "tiny-imagenet-200")):
        root = os.path.join(root, "tiny-imagenet-200")
    places = [root]
    splits = [os.path.join(root, "train")] + [os.path.join(root, s) for s in ("val", "test")
                                              if os.path.isdir(os.path.join(root, s))]
    for split in splits:
        places.append(split)
        if os.path.isdir(split):
            flat = split.endswith(("val", "test")) and (source == "tiny-imagenet" or _is_flat(split))
            _entries(split, places) if flat else _scan_image_folder(split, places)
    return places


def _check_disjoint(train_files, test_files, train_where, test_where):
    """The test split shares no file with the training split (also through symlinked folders or files; the
    lists hold the files and the symlink targets met in each split). Folders are resolved once each."""
    folders = {}

    def real(f):
        d = os.path.dirname(f)
        if d not in folders:
            folders[d] = os.path.realpath(d)
        return os.path.join(folders[d], os.path.basename(f))
    train = set(map(real, train_files))
    shared = [f for f in test_files if real(f) in train]
    if shared:
        raise DataError(f"the test split {test_where} holds {len(shared)} of the training files of {train_where}, "
                        f"e.g. {shared[0]}; the test split must hold other images")


def _check_same_classes(found, expected, found_where, expected_where):
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise DataError(f"classes in {found_where} differ from {expected_where}: "
                        f"missing {short(missing)}, extra {short(extra)}")


def short(items, limit=10):
    items = list(items)
    text = ", ".join(str(i) for i in items[:limit]) or "none"
    return text + (f" ... ({len(items)} in all)" if len(items) > limit else "")
