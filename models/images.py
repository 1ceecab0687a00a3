"""Image inputs for the CNNs (VGG19, AmoebaNet): synthetic batches, a folder of class
subfolders, or TFRecord files of `tf.train.Example`s in the usual ImageNet layout.

Images are decoded with Pillow, resized (bilinear) to the model's square size, scaled to
[0, 1] and normalised with the ImageNet channel means and standard deviations.
"""

from __future__ import annotations

import glob
import io
import os
from typing import Iterator, Sequence

import numpy as np

from models.data import DataError, iterate_batches

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def synthetic_images(
    image_size: int, num_classes: int, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    images = rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)
    return {
        "image": images,
        "label": rng.integers(0, num_classes, size=batch_size).astype(np.int32),
    }


def decode_image(data: bytes, image_size: int, source: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(img, np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{source}: cannot decode image ({e})") from None
    return (arr - MEAN) / STD


def read_image_folder(data_dir: str, image_size: int, num_classes: int):
    """`data_dir/<class name>/<image file>`: classes are the subfolders in sorted order."""
    if not os.path.isdir(data_dir):
        raise DataError(
            f"image folder {data_dir} does not exist (expected <folder>/<class>/<image>)"
        )
    classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    if not classes:
        raise DataError(
            f"image folder {data_dir} has no class subfolders (expected <folder>/<class>/<image>)"
        )
    if len(classes) > num_classes:
        raise DataError(
            f"image folder {data_dir} has {len(classes)} classes but the model has "
            f"num_classes={num_classes}"
        )
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted(glob.glob(os.path.join(data_dir, name, "*"))):
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                continue
            with open(path, "rb") as f:
                images.append(decode_image(f.read(), image_size, path))
            labels.append(label)
    if not images:
        raise DataError(
            f"image folder {data_dir} has class subfolders {classes} but no image "
            f"files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}


def read_tfrecords(
    files: Sequence[str],
    image_size: int,
    num_classes: int,
    image_key: str = "image/encoded",
    label_key: str = "image/class/label",
    label_offset: int = 0,
):
    """`tf.train.Example` records with an encoded image under `image_key` and an int64 label
    under `label_key`; `label_offset` is subtracted (ImageNet TFRecords often count from 1)."""
    import tensorflow as tf

    images, labels = [], []
    for path in files:
        if not os.path.exists(path):
            raise DataError(f"TFRecord file {path} does not exist")
        count = 0
        try:
            for i, record in enumerate(tf.compat.v1.io.tf_record_iterator(path)):
                where = f"{path} record {i}"
                try:
                    example = tf.train.Example.FromString(record)
                except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError
                    raise DataError(f"{where}: not a tf.train.Example") from None
                feature = example.features.feature
                if image_key not in feature or label_key not in feature:
                    raise DataError(
                        f"{where}: expected features '{image_key}' and '{label_key}', "
                        f"found {sorted(feature)}"
                    )
                encoded = feature[image_key].bytes_list.value
                label = feature[label_key].int64_list.value
                if len(encoded) != 1 or len(label) != 1:
                    raise DataError(f"{where}: expected one encoded image and one int64 label")
                label = int(label[0]) - label_offset
                if not 0 <= label < num_classes:
                    raise DataError(
                        f"{where}: label {label} (after offset {label_offset}) is "
                        f"outside [0, {num_classes})"
                    )
                images.append(decode_image(encoded[0], image_size, where))
                labels.append(label)
                count += 1
        except tf.errors.OpError as e:
            raise DataError(f"TFRecord file {path} is corrupt: {e.message}") from None
        if count == 0:
            raise DataError(f"TFRecord file {path} is empty")
    if not files:
        raise DataError("no TFRecord files given")
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}


def make_input_fn(image_size: int, num_classes: int):
    def input_fn(
        data: str | Sequence[str],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = None,
        **tfrecord_options,
    ) -> Iterator[dict[str, np.ndarray]]:
        """`data`: a folder of class subfolders, or a TFRecord file / list of them (a glob
        pattern is expanded). Extra keyword arguments go to `read_tfrecords`."""
        if isinstance(data, str) and os.path.isdir(data):
            arrays = read_image_folder(data, image_size, num_classes)
            source = data
        else:
            if isinstance(data, str):
                files = sorted(glob.glob(data)) or [data]
            else:
                files = list(data)
            arrays = read_tfrecords(files, image_size, num_classes, **tfrecord_options)
            source = ", ".join(files)
        return iterate_batches(arrays, batch_size, shuffle, seed, epochs, source)

    return input_fn


def image_data(image_size: int, num_classes: int) -> dict:
    """The data fields of an image classifier's ModelSpec: synthetic batches and the folder /
    TFRecord reader, both at `image_size` with `num_classes` labels."""
    return {
        "synthetic_batch": lambda batch_size, rng: synthetic_images(
            image_size, num_classes, batch_size, rng
        ),
        "input_fn": make_input_fn(image_size, num_classes),
    }
