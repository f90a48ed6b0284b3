"""Reading (`data.source: webdataset`): shards as a streamed pool (pool.Pool).

    ShardPool(index_path, image_size=None, num_workers=0) -> a pool.Pool: labels, len, shape, fetch, batches
    load_shards(data_cfg, num_workers=0)                -> RealData with ShardPool train / test

`batches` streams the shards that hold wanted samples: split over ranks (shard i goes to rank i % world),
then over the rank's loader workers (every num_workers-th of the rank's shards; shard_loader), no resampling
or shuffling; samples not in the wanted index are skipped before decoding. A rank or worker without shards
yields nothing. Every shard is checked while it streams: its keys must be the index's contiguous run, its
labels the index's labels, its sample count the index's count; a violation, an unreadable tar or an
undecodable image is a DataError naming the shard (and the sample key). The bytes read are hashed on the
way: a shard whose sha256 or size differs from its index entry is a DataError once it has been read to its
end (the samples already yielded are then discarded with the failing run); `verify_shards` checks whole shards.
"""
import os

import numpy as np
import torch

from ccfs_dist.config import MAX_SIDE      # stated limit of an image side (index shape, data.image_size)
from ccfs_dist.runtime.dist import deal, rank_world
from ccfs_dist.errors import ConfigError, DataError
from ccfs_dist.data.images import decode_image, decode_jpeg_batch, is_jpeg
from ccfs_dist.data.pool import Norm, RealData
from ccfs_dist.data.shards.index import HashingReader, check_shard_files, is_url, key_width, open_shard, read_index
from ccfs_dist.data.shards.loader import (SLOTS, WORKER_TIMEOUT_S, Workers, pack, pack_encoded, start_fork_server, unpack,
                                          unpack_encoded)
from ccfs_dist.data.shards.tar import KEY_RE, iter_samples

DECODE = ("cpu", "device")    # data.decode: loader workers decode (PIL), or hand JPEG bytes to the rank's device


class ShardPool:
    """A split stored as WebDataset shards: a streamed pool (pool.Pool, `in_memory` False).

    `labels` come from the index JSON, so selection never reads an image; `fetch` and `batches` stream
    only the shards that hold wanted samples. `image_size` overrides the index's image size (images are
    then resized and center-cropped). `num_workers` loader worker processes read and decode per rank
    (Workers: started on the first pass that needs them, reused by every later one, ended by `close` or
    with the split); with `decode="device"` they pass JPEG members on undecoded and `batches` / `stream`
    decode each batch's JPEGs on the device they are given (decode_jpeg_batch), other members as before in
    the workers. A worker that delivers nothing for `worker_timeout` seconds fails the pass (CCFSError
    naming the step and the shards it was reading).
    """
    in_memory = False

    def __init__(self, index_path, image_size=None, num_workers=0, check_files=True, allow_urls=False,
                 allow_outside=False, decode="cpu", worker_timeout=WORKER_TIMEOUT_S):
        if decode not in DECODE:
            raise ConfigError(f"data.decode must be one of {', '.join(DECODE)}, got {decode!r}")
        self.decode = decode
        self.worker_timeout = float(worker_timeout)
        self._workers = None
        self.index_path = os.path.expanduser(os.fspath(index_path))
        self.meta, self.shards = read_index(self.index_path, allow_urls, allow_outside)
        self.labels = torch.from_numpy(self.meta["labels"])
        channels, size, _ = self.meta["shape"]
        size = int(image_size) if image_size is not None else size
        if not 1 <= size <= MAX_SIDE:
            raise ConfigError(f"data.image_size must lie in 1..{MAX_SIDE}, got {size}")
        self._shape = (channels, size, size)
        self.mode = "L" if channels == 1 else "RGB"
        self.num_workers = int(num_workers)
        self._firsts = np.array([s["first"] for s in self.shards], dtype=np.int64)
        if check_files:
            check_shard_files(self.index_path, self.shards)
        if self.num_workers:
            start_fork_server()

    def __len__(self):
        return int(self.labels.numel())

    def __getstate__(self):
        """What a loader worker is sent once at its start: the index (labels as numpy), not the label tensor
        (pickling it would move it into shared memory) nor the workers."""
        state = dict(self.__dict__)
        del state["labels"], state["_workers"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _workers=None)
        self.labels = torch.from_numpy(self.meta["labels"])

    def close(self):
        """End this split's loader workers (a later pass starts new ones)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    @property
    def shape(self):
        return self._shape

    @property
    def classes(self):
        return list(self.meta["classes"])

    def shards_with(self, mask):
        """Positions of the shards holding at least one sample where the boolean `mask` is True."""
        if not len(self.shards):
            return []
        hits = np.add.reduceat(mask.astype(np.int64), self._firsts)
        return np.flatnonzero(hits).tolist()

    def _mask(self, index):
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index outside 0..{len(self) - 1} of {self.index_path}")
        mask = np.zeros(len(self), dtype=bool)
        mask[index] = True
        return index, mask

    def rank_shards(self, mask, rank, world):
        """Positions of the shards `rank` reads (for `batches` and `fetch`): those holding a wanted sample,
        dealt round-robin to the ranks."""
        return deal(self.shards_with(mask), rank, world)

    def _loader(self, mask, batch_size, rank, world, pin_memory=False, device=None):
        """Batches (uint8 images, labels, global ids) of the wanted samples in this rank's shards; with a
        `device`, JPEGs are decoded there (see _iterate)."""
        mine = self.rank_shards(mask, rank, world)
        if mine:
            stream = _ShardStream(self, [self.shards[i] for i in mine], mask, batch_size, encoded=device is not None)
            yield from self._iterate(stream, len(mine), batch_size, pin_memory, device)

    def _decode_on(self, device):
        """The device to decode JPEGs on for a pass to `device` (None: in the loader workers)."""
        return device if self.decode == "device" else None

    def stream(self, positions, mask, batch_size, interleave=1, seed=(0,), pin_memory=False, device=None):
        """Batches (uint8 images, labels, global ids) of the wanted samples (`mask`) of the shards at
        `positions`, for training on the stream (stream_train). The shards are dealt round-robin to this
        split's loader workers in the given order; each worker reads `interleave` of its shards at once and
        draws every next sample from one of them at random (probability proportional to its wanted samples
        left, from `seed` + the worker id), so that a batch mixes several shards (a class-sorted source
        puts few classes in one shard). The shard checks are those of `batches`. With decode="device" the
        images come decoded on `device` (labels and ids stay on the CPU); else on the CPU."""
        if len(positions):
            decode_on = self._decode_on(device)
            stream = _InterleavedStream(self, [self.shards[i] for i in positions], mask, batch_size,
                                        interleave, tuple(seed), encoded=decode_on is not None)
            yield from self._iterate(stream, len(positions), batch_size, pin_memory, decode_on)

    def _iterate(self, stream, n_shards, batch_size, pin_memory, device=None):
        """(images, labels, ids) views of the packed batches of a _ShardStream, through this split's loader
        workers (min(num_workers, n_shards) of them; none: in this process); an encoded stream's batches are
        decoded on `device` (fresh image tensors there)."""
        workers = min(self.num_workers, n_shards)
        if workers == 0:
            items = iter(stream)
        else:
            if self._workers is None:
                self._workers = Workers(self, self.worker_timeout)
            items = self._workers.run(stream, workers)
        for item in items:
            if pin_memory and workers:           # as the DataLoader did: a worker's batch, pinned for the copy
                item = (item[0].pin_memory(), item[1])
            if stream.encoded:
                yield self._decoded(*unpack_encoded(*item, batch_size), device)
            else:
                yield unpack(*item, batch_size, self._shape)

    def _decoded(self, payloads, jpeg, labels, ids, device):
        """(uint8 images on `device`, labels, ids) of an encoded batch: the JPEGs decoded together on the device
        (decode_jpeg_batch), the members the workers decoded (PNG, ...) copied there."""
        out = torch.empty((len(payloads),) + self._shape, dtype=torch.uint8, device=device)
        rows = np.flatnonzero(jpeg)
        if len(rows):
            try:
                images = decode_jpeg_batch([payloads[i] for i in rows], self.mode, self._shape[1], device)
            except RuntimeError:          # decode_jpeg names no image: decode them one by one, see _decode_one
                images = [self._decode_one(payloads[i], int(ids[i]), device) for i in rows]
            out[torch.from_numpy(rows).to(device)] = torch.stack(images)
        rows = np.flatnonzero(~jpeg)
        if len(rows):
            pixels = torch.stack([payloads[i].view(self._shape) for i in rows])
            out[torch.from_numpy(rows).to(device)] = pixels.to(device)
        return out, labels, ids

    def _decode_one(self, payload, gid, device):
        """One JPEG the batch decode failed on: on the device alone, else by the CPU path (PIL: it may read what
        the device's decoder does not), whose DataError names the shard and key as decode="cpu" does."""
        try:
            return decode_jpeg_batch([payload], self.mode, self._shape[1], device)[0]
        except RuntimeError:
            shard = self.shards[int(np.searchsorted(self._firsts, gid, side="right")) - 1]
            key = f"{gid:0{self.meta.get('key_width', key_width(len(self)))}d}"
            img = decode_image(payload.numpy().tobytes(), self.mode, self._shape,
                               what=f"shard {shard['url']}, sample {key}")
            return img.to(device)

    def batches(self, index, batch_size, rank, world, device):
        """Yield this rank's wanted samples as (uint8 images, labels, global ids) on `device`.

        Shards holding wanted samples are dealt round-robin to ranks, then to DataLoader workers; unwanted
        samples are skipped. The union over ranks is every wanted sample exactly once.
        """
        _, mask = self._mask(index)
        cuda = device.type == "cuda"
        decode_on = self._decode_on(device)
        for x, y, ids in self._loader(mask, batch_size, rank, world, pin_memory=cuda and decode_on is None,
                                      device=decode_on):
            if cuda:
                yield (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                       ids.to(device, non_blocking=True))
            else:   # labels and ids of their own: a consumer keeping them must not keep the batch buffer alive
                    # (x is a view of it too under decode="cpu")
                yield x, y.clone(), ids.clone()

    def fetch(self, index, accelerator=None, batch_size=256):
        """(uint8 images, labels) of the samples `index`, in that order: one pass over the shards holding them.

        With an `accelerator` of N processes (every rank must call it, with the same index) the shards are
        dealt to the ranks as in `batches`, each rank reads and decodes its share only, and the images are
        all-gathered in pieces: every rank returns the same tensors having read 1/N of the data.
        """
        index, mask = self._mask(index)
        wanted = np.flatnonzero(mask)
        rank, world = rank_world(accelerator)
        if world == 1:
            out, found = self._fetch_into(mask, wanted, batch_size, 0, 1)
        else:
            from ccfs_dist.runtime.dist import gather_rows_in_pieces
            in_mine = np.zeros(len(self), dtype=bool)                  # the samples of this rank's shards
            for s in self.rank_shards(mask, rank, world):
                in_mine[self.shards[s]["first"]:self.shards[s]["first"] + self.shards[s]["count"]] = True
            mine = wanted[in_mine[wanted]]
            local, local_found = self._fetch_into(mask, mine, batch_size, rank, world)
            if not local_found.all():                                  # reported below, on every rank alike
                local, mine = local[torch.from_numpy(local_found)], mine[local_found]
            out = torch.empty((len(wanted),) + self._shape, dtype=torch.uint8)
            found = np.zeros(len(wanted), dtype=bool)
            for got in gather_rows_in_pieces(accelerator, {"images": local, "ids": torch.from_numpy(mine)}):
                pos = np.searchsorted(wanted, got["ids"].numpy())
                out[torch.from_numpy(pos)] = got["images"]
                found[pos] = True
        if not found.all():
            raise DataError(f"{self.index_path}: {int((~found).sum())} wanted samples not found in the shards, "
                            f"e.g. index {int(wanted[~found][0])}")
        if not (len(index) == len(wanted) and np.array_equal(index, wanted)):
            out = out.index_select(0, torch.from_numpy(np.searchsorted(wanted, index)))
        return out, self.labels[torch.from_numpy(index)]

    def fetch_shares(self, index, accelerator=None, batch_size=256):
        """Yield this rank's share of the samples `index` (unique) as (positions in `index`, uint8 images):
        those of the shards `fetch` deals to this rank, read once and handed over batch by batch, so a caller
        writing them into a shared file (synthetic.write) never holds the whole set. Every rank must iterate
        it to its end (the check that every sample was found is collective)."""
        index, mask = self._mask(index)
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        if len(index) > 1 and (ordered[1:] == ordered[:-1]).any():
            raise ValueError("fetch_shares needs unique indices")
        rank, world = rank_world(accelerator)
        found = 0
        for x, _, ids in self._loader(mask, batch_size, rank, world):
            found += len(ids)
            yield order[np.searchsorted(ordered, ids.numpy())], x
        if world > 1:
            found = int(accelerator.gather(torch.tensor([found], device=accelerator.device)).sum())
        if found != len(index):
            raise DataError(f"{self.index_path}: {len(index) - found} wanted samples not found in the shards")

    def _fetch_into(self, mask, rows, batch_size, rank, world):
        """Read this rank's share of the wanted samples into a new tensor whose row i is sample rows[i] (rows:
        sorted global indices). Returns (images, found per row)."""
        out = torch.empty((len(rows),) + self._shape, dtype=torch.uint8)
        found = np.zeros(len(rows), dtype=bool)
        for x, _, ids in self._loader(mask, batch_size, rank, world):
            pos = np.searchsorted(rows, ids.numpy())
            if pos.max(initial=-1) >= len(rows) or not np.array_equal(rows[pos], ids.numpy()):
                raise DataError(f"{self.index_path}: a shard yielded samples outside this rank's share")
            out[torch.from_numpy(pos)] = x
            found[pos] = True
        return out, found


class _ShardStream:
    """One pass: `shards` -> WebDataset samples -> checked, filtered by the mask, decoded -> batches; in loader
    worker w of n (`worker` = (w, n), set by Workers.run) only its share of `shards` (every n-th, from the
    w-th). A worker without shards yields nothing. `encoded` (decode="device"): JPEG members are passed on
    as their bytes (pack_encoded), others decoded."""

    def __init__(self, split, shards, mask, batch_size, encoded=False):
        self.split, self.shards, self.mask, self.batch_size = split, shards, mask, batch_size
        self.encoded = encoded
        self.worker = None           # (id, count) in a loader worker
        self.slots = None            # in a loader worker: (shared array, first slot) recording the open shards

    def __iter__(self):
        shards = self.shards if self.worker is None else deal(self.shards, *self.worker)
        yield from self._batches(shards)

    def _reading(self, shard):
        """self._samples(shard), recorded in this worker's slots while it is open (the rank names the shards
        of a stalled worker from them)."""
        slot = None
        if self.slots is not None:
            array, first = self.slots
            slot = next((i for i in range(first, first + SLOTS) if array[i] < 0), None)
            if slot is not None:
                array[slot] = shard["first"]
        try:
            yield from self._samples(shard)
        finally:
            if slot is not None:
                array[slot] = -1

    def _batches(self, shards):
        """Packed batches (buffer, n): see pack."""
        imgs, labels, ids = [], [], []
        for shard in shards:
            for gid, label, img in self._reading(shard):
                imgs.append(img)
                labels.append(label)
                ids.append(gid)
                if len(ids) == self.batch_size:
                    yield self._packed(imgs, labels, ids)
                    imgs, labels, ids = [], [], []
        if ids:
            yield self._packed(imgs, labels, ids)

    def _packed(self, imgs, labels, ids):
        """One packed buffer of a batch (torch.stack into it: one call instead of a copy per image)."""
        if self.encoded:
            jpeg = [isinstance(p, bytes) for p in imgs]                  # the rest: pixels a worker decoded
            return pack_encoded(self.batch_size, [p if j else p.numpy().tobytes() for p, j in zip(imgs, jpeg)],
                                 jpeg, labels, ids)
        buf, images, meta = pack(self.batch_size, self.split.shape)
        n = len(ids)
        torch.stack(imgs, out=images[:n])
        meta[0, :n], meta[1, :n] = torch.tensor(labels), torch.tensor(ids)
        return buf, n

    def _samples(self, shard):
        """(global index, label, uint8 image) of the wanted samples of one shard, with its accounting checked."""
        url, first, count = shard["url"], shard["first"], shard["count"]
        split, mask, shape, mode = self.split, self.mask, self.split.shape, self.split.mode
        labels = split.meta["labels"]                             # numpy: cheaper to index than the tensor
        expect, last_key = first, None
        where = f"shard {url}"
        stream = HashingReader(open_shard(url, where))
        try:
            for key, files in iter_samples(stream, where):
                if not KEY_RE.fullmatch(key.encode("utf-8", "surrogateescape")) or int(key) != expect:
                    after = f" after key {last_key}" if last_key is not None else " as its first sample"
                    raise DataError(f"{where}: found key {key!r}{after}, expected index {expect} "
                                    f"(shard and index {split.index_path} disagree)")
                if expect >= first + count:
                    raise DataError(f"{where}: more samples than the {count} its index {split.index_path} lists")
                last_key, expect = key, expect + 1
                gid = int(key)
                exts = [e for e in files if e != "cls"]
                if "cls" not in files or len(exts) != 1:
                    raise DataError(f"{where}, sample {key}: expected a .cls label and one image, found "
                                    f"{sorted(files)} (truncated shard?)")
                label = files["cls"].strip()
                if not KEY_RE.fullmatch(label) or int(label) != labels[gid]:
                    raise DataError(f"{where}, sample {key}: label {label.decode(errors='replace')!r} differs "
                                    f"from the index's {labels[gid]}")
                if mask[gid]:
                    data = files[exts[0]]
                    if self.encoded and is_jpeg(data):
                        yield gid, int(label), data
                    else:
                        yield gid, int(label), decode_image(data, mode, shape, what=f"{where}, sample {key}")
            if expect == first + count:
                stream.read_to_end()
        except OSError as e:
            raise DataError(f"cannot read {where} after key {last_key}: {e}") from e
        finally:
            stream.close()
        if expect != first + count:
            detail = f" (the last is {last_key})" if last_key is not None else ""
            raise DataError(f"{where} holds {expect - first} samples{detail}, its index {split.index_path} "
                            f"says {count}: truncated or corrupt shard")
        stream.check(shard, where, split.index_path)


def verify_shards(index_path, allow_urls=False, allow_outside=False):
    """Read every shard of an index whole: its keys, labels and sample count against the index, and its size
    and sha256 against those recorded. Images are not decoded. Returns the number of shards; the first
    disagreement is a DataError naming the shard."""
    split = ShardPool(index_path, allow_urls=allow_urls, allow_outside=allow_outside)
    stream = _ShardStream(split, split.shards, np.zeros(len(split), dtype=bool), 1)
    for shard in split.shards:
        for _ in stream._samples(shard):           # nothing is wanted: every sample is checked, none decoded
            pass
    return len(split.shards)


class _InterleavedStream(_ShardStream):
    """A _ShardStream whose worker reads `interleave` of its shards at once (opening the next when one ends)
    and draws each next sample from an open shard chosen at random with probability proportional to its
    wanted samples left: a uniformly random merge of the open shards' sample sequences."""

    def __init__(self, split, shards, mask, batch_size, interleave, seed, encoded=False):
        super().__init__(split, shards, mask, batch_size, encoded)
        self.interleave, self.seed = max(1, int(interleave)), seed

    def _batches(self, shards):
        rng = np.random.default_rng(list(self.seed) + [0 if self.worker is None else self.worker[0]])
        pending, readers, left, total = list(shards), [], [], 0
        imgs, labels, ids = [], [], []
        uniform = iter(())
        while pending or readers:
            while pending and len(readers) < self.interleave:
                shard = pending.pop(0)
                readers.append(self._reading(shard))
                left.append(int(self.mask[shard["first"]:shard["first"] + shard["count"]].sum()))
                total += left[-1]
            pick = 0
            if total:                                  # the open shard holding the r-th of the samples left
                u = next(uniform, None)
                if u is None:                          # random numbers drawn 4096 at a time: cheaper per sample
                    uniform = iter(rng.random(4096).tolist())
                    u = next(uniform)
                r = min(int(u * total), total - 1)
                while r >= left[pick]:
                    r -= left[pick]
                    pick += 1
            if left[pick]:
                gid, label, img = next(readers[pick])
                imgs.append(img)
                labels.append(label)
                ids.append(gid)
                left[pick] -= 1
                total -= 1
                if len(ids) == self.batch_size:
                    yield self._packed(imgs, labels, ids)
                    imgs, labels, ids = [], [], []
            if not left[pick]:                         # read the shard to its end: its count checks run there
                for gid, _, _ in readers[pick]:
                    raise DataError(f"{self.split.index_path}: sample {gid} is wanted beyond its shard's count")
                del readers[pick], left[pick]
        if ids:
            yield self._packed(imgs, labels, ids)


def load_shards(data_cfg, num_workers=0):
    """RealData of a `webdataset` source: data.root = train index JSON, data.test_root = test index JSON."""
    root, test_root, image_size = data_cfg.get("root"), data_cfg.get("test_root"), data_cfg.get("image_size")
    if root is None:
        raise ConfigError("data source 'webdataset' needs 'data.root' (the train index JSON written by "
                          "`ccfs shards`, e.g. shards/train.json)")
    if test_root is None:
        raise ConfigError("data source 'webdataset' needs 'data.test_root' (the test index JSON written by "
                          "`ccfs shards`, e.g. shards/test.json)")
    trust = {"allow_urls": bool(data_cfg.get("allow_urls")), "allow_outside": bool(data_cfg.get("allow_outside")),
             "decode": data_cfg.get("decode", "cpu"), "worker_timeout": data_cfg.get("worker_timeout", WORKER_TIMEOUT_S)}
    train = ShardPool(root, image_size=image_size, num_workers=num_workers, **trust)
    test = ShardPool(test_root, image_size=train.shape[1], num_workers=num_workers, **trust)
    for key, split, want in (("data.root", train, "train"), ("data.test_root", test, "test")):
        if split.meta.get("split", want) != want:
            raise DataError(f"{key} {split.index_path} is the {split.meta['split']!r} split (its index says "
                            f"split: {split.meta['split']}), expected the {want} split")
    if os.path.realpath(train.index_path) == os.path.realpath(test.index_path) or (
            train.meta.get("source") and train.meta.get("source") == test.meta.get("source")):
        raise DataError(f"data.test_root {test.index_path} holds the same samples as data.root {train.index_path}; "
                        f"name the test split's index (e.g. test.json)")
    shared = {os.path.realpath(s["url"]) for s in train.shards if not is_url(s["url"])} & \
        {os.path.realpath(s["url"]) for s in test.shards if not is_url(s["url"])}
    if shared:
        raise DataError(f"data.test_root {test.index_path} names {len(shared)} shard file(s) of data.root "
                        f"{train.index_path}, e.g. {sorted(shared)[0]}; the test split must hold other samples")
    if test.classes != train.classes or test.shape != train.shape:
        raise DataError(f"{test.index_path} does not match {train.index_path}: {len(test.classes)} vs "
                        f"{len(train.classes)} classes, {test.shape[0]} vs {train.shape[0]} channels; "
                        f"write both splits from the same source")
    mean, std = train.meta.get("mean"), train.meta.get("std")
    if mean is None or std is None or len(mean) != train.shape[0] or len(std) != train.shape[0]:
        raise DataError(f"{train.index_path} has no per-channel mean/std; rewrite the train shards with `ccfs shards`")
    return RealData(train.meta.get("name", "webdataset"), train.classes, train, test,
                    Norm(tuple(float(v) for v in mean), tuple(float(v) for v in std)))
