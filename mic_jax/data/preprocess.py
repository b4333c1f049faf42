"""Image preprocessing inside the tf.data graph.

Randomness is *stateless*: every random op is seeded by (seed, position of
the example in the stream), so the augmented image of the n-th training
example is a pure function of (seed, n). That is what lets the stream resume
bit-for-bit after a restart.
"""

from __future__ import annotations

import tensorflow as tf

# Product photos are usually centred and small; a milder crop than ImageNet's
# (0.08, 1) keeps the product in view.
CROP_AREA = (0.25, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)


def _to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """uint8-valued float [0, 255] -> [-1, 1]."""
  return image / 127.5 - 1.0


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_jpeg(encoded, channels=3)


def train_image(encoded: tf.Tensor, present: tf.Tensor, size: int,
                seed: tf.Tensor) -> tf.Tensor:
  """Random resized crop + horizontal flip, [-1, 1]; zeros when absent.

  Args:
    encoded: JPEG bytes (scalar string; empty when no image).
    present: int64 scalar, 1 when there is an image.
    size: output height and width.
    seed: int32/int64 [2] stateless seed unique to this example.
  """
  def crop() -> tf.Tensor:
    image = _decode(encoded)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]),
        seed=seeds[0], area_range=CROP_AREA,
        aspect_ratio_range=CROP_ASPECT, min_object_covered=0.0,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, box_size)
    image = tf.image.resize(image, [size, size], method="bilinear",
                            antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    return _to_unit_range(tf.clip_by_value(image, 0.0, 255.0))

  return tf.cond(present > 0, crop, lambda: tf.zeros([size, size, 3]))


def photo_key(encoded: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
  """A 64-bit content key (int64 scalar) of a product's photo.

  The FarmHash fingerprint of the JPEG bytes; every product without a photo
  (``present == 0``) shares the key of empty bytes, :func:`no_photo_key`.
  Products with byte-identical photos share a key, which is what a cache of
  a frozen image tower's outputs wants: the eval transform is a pure
  function of the bytes.
  """
  data = tf.where(present > 0, encoded, tf.constant(b""))
  digest = tf.fingerprint(tf.reshape(data, [1]))[0]  # uint8 [8]
  return tf.bitcast(digest, tf.int64)


def no_photo_key() -> int:
  """The :func:`photo_key` of a product without a photo."""
  return int(photo_key(tf.constant(b""), tf.constant(0, tf.int64)).numpy())


def eval_image(encoded: tf.Tensor, present: tf.Tensor, size: int
               ) -> tf.Tensor:
  """Resize the short side to ``size``, centre crop, [-1, 1]; zeros if absent.

  No extra zoom: product photos are framed tightly, so a crop fraction below
  one would cut off the product's edges.
  """
  return tf.cond(present > 0, lambda: eval_pixels(_decode(encoded), size),
                 lambda: tf.zeros([size, size, 3]))


def eval_pixels(image: tf.Tensor, size: int) -> tf.Tensor:
  """The eval transform of decoded ``uint8 [H, W, 3]`` pixels (also serving's)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  top = (new[0] - size) // 2
  left = (new[1] - size) // 2
  image = image[top:top + size, left:left + size, :]
  image = tf.ensure_shape(image, [size, size, 3])
  return _to_unit_range(tf.clip_by_value(image, 0.0, 255.0))
