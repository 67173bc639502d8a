"""COCO Captions (val2014) as users keep it: captions_val2014.json, the image folder and, optionally,
Karpathy's split file `dataset_coco.json`.

With a Karpathy file only the images of its `split` are used (default "test": the 5,000-image split
captioning papers report on; "val" is the other 5,000). All of Karpathy's val and test images come from
val2014. The reference captions always come from captions_val2014.json (the Karpathy file only selects
images); they are the same human captions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from knobsweep.workloads import DataError, load_json, require_keys

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class CaptionSample:
    image_id: int
    image_path: Path
    captions: tuple[str, ...]  # every reference caption of the image, sorted by annotation id


def load_coco_captions(
    captions_json: str | Path,
    image_dir: str | Path,
    karpathy_split: str | Path | None = None,
    split: str = "test",
) -> list[CaptionSample]:
    """One sample per image (with all of its captions), sorted by image id.

    Raises DataError (naming the file and the id) for a missing path, broken JSON, a caption of an image
    id the file does not list, an image without captions, or a Karpathy image unknown to `captions_json`.
    """
    captions_json, image_dir = Path(captions_json), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"COCO image directory {image_dir} does not exist (or is not a directory)")
    data = load_json(captions_json, "COCO captions")
    require_keys(data, ("images", "annotations"), captions_json, "the top level")

    file_names: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        require_keys(img, ("id", "file_name"), captions_json, f"image #{i}")
        file_names[int(img["id"])] = str(img["file_name"])
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        require_keys(ann, ("image_id", "caption"), captions_json, f"annotation #{i}")
        image_id = int(ann["image_id"])
        if image_id not in file_names:
            raise DataError(
                f"{captions_json}: caption {ann.get('id', f'#{i}')} refers to unknown image_id {image_id}"
            )
        captions[image_id].append((int(ann.get("id", i)), str(ann["caption"]).strip()))

    image_ids = sorted(file_names)
    if karpathy_split is not None:
        image_ids = _karpathy_image_ids(Path(karpathy_split), split, captions_json, file_names)

    samples = []
    for image_id in image_ids:
        if not captions.get(image_id):
            raise DataError(f"{captions_json}: image_id {image_id} ({file_names[image_id]}) has no captions")
        samples.append(
            CaptionSample(
                image_id=image_id,
                image_path=(image_dir / file_names[image_id]).absolute(),
                captions=tuple(text for _, text in sorted(captions[image_id])),
            )
        )
    if not samples:
        raise DataError(
            f"{captions_json}: no images"
            + (f" in split {split!r} of {karpathy_split}" if karpathy_split else "")
        )
    return samples


def _karpathy_image_ids(path: Path, split: str, captions_json: Path, file_names: dict[int, str]) -> list[int]:
    """COCO ids of the images of `split` in a Karpathy split file (`{"images": [{"cocoid", "split", ...}]}`)."""
    if split not in KARPATHY_SPLITS:
        raise DataError(f"Karpathy split {split!r} is not one of {KARPATHY_SPLITS} (file {path})")
    data = load_json(path, "Karpathy split")
    require_keys(data, ("images",), path, "the top level")
    ids = []
    for i, entry in enumerate(data["images"]):
        require_keys(entry, ("cocoid", "split"), path, f"image #{i}")
        if entry["split"] != split:
            continue
        cocoid = int(entry["cocoid"])
        if cocoid not in file_names:
            raise DataError(
                f"{path}: image cocoid {cocoid} ({entry.get('filename', '?')}, split {split!r}) is not "
                f"in {captions_json}; Karpathy's {split} images must come from that file's images"
            )
        ids.append(cocoid)
    return sorted(set(ids))
