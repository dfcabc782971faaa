"""PASCAL VOC 2012 (optionally with the SBD ``SegmentationClassAug`` masks).

Ids come from ``ImageSets/Segmentation/<split>.txt`` (else ``ImageSets/Main/<split>.txt``) or from an
explicit id list such as the authors' ``voc12/train_aug_id.txt``. Labels come, in this order, from the
authors' ``cls_labels.npy``, from the segmentation mask (``SegmentationClass`` preferred over
``SegmentationClassAug``), or from ``Annotations/<id>.xml`` (every object, difficult ones included,
as the authors' label script does). The GT mask travels with the image whenever one exists.

``cls_labels.npy`` is a pickled object array; it is read with an unpickler that only rebuilds numpy
arrays and dicts, so a tampered label file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import xml.etree.ElementTree as ET

import numpy as np

from system import storage
from system.data.sources import BadEntry, Entry, Loaded, SourceConfig, labels_from_mask
from system.masks import decode_mask

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
_MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a label file")
        return super().find_class(module, name)


def load_cls_labels(uri: str) -> dict[str, np.ndarray]:
    """The authors' ``cls_labels.npy``: a 0-d object array holding {id: float32 multi-hot}."""
    stream = io.BytesIO(storage.get_bytes(uri))
    major, _ = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    _, _, dtype = read_header(stream)
    if dtype != np.dtype(object):
        raise ValueError(f"{uri}: expected a pickled object array, got dtype {dtype}")
    array = _NumpyOnlyUnpickler(stream).load()
    table = array.item() if isinstance(array, np.ndarray) else array
    if not isinstance(table, dict):
        raise ValueError(f"{uri}: expected a dict of id -> label vector, got {type(table).__name__}")
    return table


def _read_ids(uri: str) -> list[str]:
    return [line.split()[0] for line in storage.get_bytes(uri).decode().splitlines() if line.strip()]


class VocSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.root = cfg.path
        self.class_names = list(VOC_CLASSES)

    def _id_list(self) -> list[str]:
        if self.cfg.ids_file:
            return _read_ids(self.cfg.ids_file)
        for sub in ("Segmentation", "Main"):
            uri = storage.join(self.root, "ImageSets", sub, f"{self.cfg.split}.txt")
            if storage.exists(uri):
                return _read_ids(uri)
        raise FileNotFoundError(f"{self.root}: no ImageSets/Segmentation|Main/{self.cfg.split}.txt")

    def entries(self):
        ids = self._id_list()
        masks = {}
        for sub in reversed(_MASK_DIRS):
            for uri in storage.list_uris(storage.join(self.root, sub)):
                name = uri.rsplit("/", 1)[-1]
                if name.endswith(".png"):
                    masks[name[:-4]] = uri
        table = load_cls_labels(self.cfg.labels_file) if self.cfg.labels_file else None
        for sample_id in ids:
            labels = None
            if table is not None:
                vector = table.get(sample_id)
                labels = (
                    ()
                    if vector is None
                    else tuple(self.class_names[k] for k in np.flatnonzero(np.asarray(vector) > 0.5))
                )
            yield Entry(
                id=sample_id,
                image=storage.join(self.root, "JPEGImages", f"{sample_id}.jpg"),
                labels=labels,
                extra={"mask": masks.get(sample_id), "xml": storage.join(self.root, "Annotations", f"{sample_id}.xml")},
            )

    def load(self, entry: Entry) -> Loaded:
        image = storage.get_bytes(entry.image)
        mask_uri = entry.extra["mask"]
        mask = decode_mask(storage.get_bytes(mask_uri)) if mask_uri else None
        labels = entry.labels
        if labels is None:
            labels = (
                labels_from_mask(mask, self.class_names) if mask is not None else self._xml_labels(entry.extra["xml"])
            )
        return Loaded(image, mask if self.cfg.masks else None, labels)

    @staticmethod
    def _xml_labels(uri: str) -> tuple[str, ...]:
        try:
            tree = ET.fromstring(storage.get_bytes(uri))
        except FileNotFoundError:
            raise BadEntry("no_labels", f"no labels: neither a mask nor {uri.rsplit('/', 1)[-1]}") from None
        except ET.ParseError as exc:
            raise BadEntry("unreadable_annotation", f"unreadable annotation XML ({exc})") from None
        names = [(obj.findtext("name") or "").strip() for obj in tree.iter("object")]
        return tuple(dict.fromkeys(n for n in names if n))
