"""Overlays of predictions on radiographs: masks, boxes, labels and a header.

Drawn with PIL only. Colours are saturated and every label sits on a dark
box, so the drawing stays legible on any grey level of a radiograph.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from big_vision_cxr import atomic
from big_vision_cxr import errors

PALETTE = (
    (255, 64, 64), (64, 200, 255), (255, 200, 0), (80, 255, 80),
    (255, 80, 255), (255, 140, 0), (0, 255, 200), (180, 120, 255),
)
MASK_ALPHA = 0.4
LABEL_BG = (0, 0, 0)
HEADER_BG = (16, 16, 16)
HEADER_FG = (255, 255, 255)


class VisualizeError(errors.Error):
  """An image or object that cannot be drawn."""


def _font(size):
  return ImageFont.load_default(size=size)


def to_rgb(image):
  """uint8 [H,W] or [H,W,1|3] -> RGB PIL image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise VisualizeError(f"overlay needs a uint8 image, got dtype {image.dtype}.")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise VisualizeError(f"overlay needs an image [H,W] or [H,W,3], got shape {image.shape}.")
  return Image.fromarray(image, "RGB")


def _box_pixels(bbox, width, height):
  """Normalised (y_min, x_min, y_max, x_max) -> pixel (x0, y0, x1, y1) for PIL."""
  y0, x0, y1, x1 = (float(v) for v in bbox)
  return (x0 * width, y0 * height, x1 * width, y1 * height)


def _paint_mask(canvas, mask, colour):
  """Alpha-blends a bool mask [h,w] (any size; resized nearest) onto `canvas` in place."""
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise VisualizeError(f"a mask must be [H,W], got shape {mask.shape}.")
  if mask.shape != canvas.shape[:2]:
    mask = np.asarray(Image.fromarray(mask).resize(canvas.shape[1::-1], Image.NEAREST), bool)
  blend = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * np.asarray(colour, np.float32)
  canvas[mask] = blend.round().astype(np.uint8)


def _label_text(obj):
  text = str(obj.get("label", ""))
  if obj.get("score") is not None:
    text += f" {float(obj['score']):.2f}"
  return text.strip()


def _draw_label(draw, xy, text, colour, font, limits):
  """A label on a dark box at `xy` (its lower-left corner), kept inside `limits`."""
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  w, h = right - left + 6, bottom - top + 6
  x = min(max(0, xy[0]), max(0, limits[0] - w))
  y = xy[1] - h
  if y < 0:
    y = xy[1]
  y = min(y, max(0, limits[1] - h))
  draw.rectangle((x, y, x + w, y + h), fill=LABEL_BG, outline=colour)
  draw.text((x + 3 - left, y + 3 - top), text, fill=colour, font=font)


def overlay(image, objects=(), header=(), max_side=1024):
  """Draws `objects` on `image` with `header` text lines above it.

  Args:
    image: uint8 [H,W] or [H,W,3] radiograph.
    objects: dicts with `bbox` (normalised y_min, x_min, y_max, x_max), `label`,
      optional `score` and optional `mask` (bool [h,w] over the whole image, any
      size: it is resized to the drawing).
    header: text lines (e.g. the diagnosis and its probability) drawn on a
      dark band above the image.
    max_side: the longer side of the drawn image; larger images are shrunk.

  Returns:
    An RGB PIL image.
  """
  img = to_rgb(image)
  scale = min(1.0, max_side / max(img.size))
  if scale < 1.0:
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.BILINEAR)
  width, height = img.size
  canvas = np.array(img)
  for k, obj in enumerate(objects):
    if obj.get("mask") is not None:
      _paint_mask(canvas, obj["mask"], PALETTE[k % len(PALETTE)])
  img = Image.fromarray(canvas)
  draw = ImageDraw.Draw(img)
  line = max(2, round(max(width, height) / 250))
  font = _font(max(12, round(max(width, height) / 40)))
  for k, obj in enumerate(objects):
    colour = PALETTE[k % len(PALETTE)]
    if obj.get("bbox") is None:
      continue
    x0, y0, x1, y1 = _box_pixels(obj["bbox"], width, height)
    draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=line)
    text = _label_text(obj)
    if text:
      _draw_label(draw, (x0, y0), text, colour, font, (width, height))
  return _with_header(img, list(header), font)


def _wrap(measure, text, font, width):
  """Splits `text` into lines no wider than `width` pixels (words kept whole)."""
  out, current = [], ""
  for word in text.split(" "):
    trial = f"{current} {word}" if current else word
    if current and measure.textlength(trial, font=font) > width:
      out.append(current)
      current = word
    else:
      current = trial
  return out + [current]


def _with_header(img, lines, font):
  if not lines:
    return img
  measure = ImageDraw.Draw(img)
  lines = [w for l in lines for part in str(l).splitlines() or [""]
           for w in _wrap(measure, part, font, img.width - 16)]
  heights = [measure.textbbox((0, 0), l or " ", font=font) for l in lines]
  band = sum(b[3] - b[1] + 8 for b in heights) + 8
  out = Image.new("RGB", (img.width, img.height + band), HEADER_BG)
  out.paste(img, (0, band))
  draw = ImageDraw.Draw(out)
  y = 6
  for text, (left, top, _, bottom) in zip(lines, heights):
    draw.text((8 - left, y - top), text, fill=HEADER_FG, font=font)
    y += bottom - top + 8
  return out


def save_overlay(path, image, objects=(), header=(), max_side=1024):
  """`overlay()` written as a PNG at `path` (atomically; a symlink there is replaced)."""
  picture = overlay(image, objects, header, max_side)
  with atomic.target(path) as tmp:
    picture.save(tmp, format="PNG", optimize=True)
