"""Overlays of predictions on radiographs: masks, boxes, labels and a header.

Drawn with PIL only. Colours are saturated and every label sits on a dark
box, so the drawing stays legible on any grey level of a radiograph.
"""
import itertools

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
HEADER_MAX_LINES = 3  # per header entry (a report, a flag); longer ones end with '…'
GT_COLOUR, GT_GAP = (255, 255, 255), (0, 0, 0)  # ground truth: white dashes, black gaps
ELLIPSIS = "\u2026"


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


def _prefix_length(measure, text, font, width, suffix=""):
  """The length of the longest prefix of `text` that fits `width` pixels with `suffix` after it."""
  lo, hi = 0, len(text)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if measure.textlength(text[:mid] + suffix, font=font) <= width:
      lo = mid
    else:
      hi = mid - 1
  return lo


def _fit(measure, text, font, width):
  """`text`, cut and ended with '…' where it is wider than `width` pixels."""
  if measure.textlength(text, font=font) <= width:
    return text
  return text[:_prefix_length(measure, text, font, width, ELLIPSIS)].rstrip() + ELLIPSIS


def _overlaps(a, b):
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(anchors, sizes, width, height):
  """Where labels go: a rectangle (x0, y0, x1, y1) (x1, y1 exclusive) per label.

  The labels of `anchors` (boxes in pixels, x0, y0, x1, y1) with `sizes`
  (w, h), in order, each at the first free place among: above its box, below it,
  inside its top, inside its bottom, then the free place nearest to above it.
  The rectangles are pairwise disjoint and inside the width x height image; a
  label with no free place (or larger than the image) gets None.
  """
  placed, out = [], []
  for (x0, y0, x1, y1), (w, h) in zip(anchors, sizes):
    if w > width or h > height:
      out.append(None)
      continue
    x = int(min(max(0, x0), width - w))
    wanted = [(x, y0 - h), (x, y1), (x, y0), (x, y1 - h)]
    ys = sorted({*range(0, height - h + 1, max(1, h // 2)), height - h})
    xs = sorted({*range(0, width - w + 1, max(1, w // 4)), width - w})
    wanted += sorted(((gx, gy) for gy in ys for gx in xs),
                     key=lambda p: (p[0] - x) ** 2 + (p[1] - (y0 - h)) ** 2)
    rect = None
    for px, py in wanted:
      px, py = int(min(max(0, px), width - w)), int(min(max(0, py), height - h))
      candidate = (px, py, px + w, py + h)
      if not any(_overlaps(candidate, r) for r in placed):
        rect = candidate
        break
    if rect is not None:
      placed.append(rect)
    out.append(rect)
  return out


def _dashed_rectangle(draw, box, width, dash):
  """`box`'s outline in GT_COLOUR dashes of `dash` pixels with GT_GAP gaps between them."""
  x0, y0, x1, y1 = box
  corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
  for (ax, ay), (bx, by) in zip(corners, corners[1:]):
    length = max(abs(bx - ax), abs(by - ay), 1e-9)
    for k, t in enumerate(np.arange(0, length, dash)):
      ends = [(ax + (bx - ax) * u, ay + (by - ay) * u)
              for u in (t / length, min(1, (t + dash) / length))]
      draw.line(ends, fill=GT_GAP if k % 2 else GT_COLOUR, width=width)


def label_layout(objects, ground_truth, size, font):
  """[(text, colour, box, rect)] of every label on a drawing of `size` (width, height).

  Labels of objects without a mask come first, then those with a mask, then the
  ground truth's, so a mask's label never displaces a box's. `box` is the
  object's in pixels, `rect` comes from place_labels (None: no free place, not
  drawn); a text wider than the image is cut with '…'.
  """
  width, height = size
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  coloured = [(obj, PALETTE[k % len(PALETTE)]) for k, obj in enumerate(objects)]
  ordered = ([c for c in coloured if c[0].get("mask") is None]
             + [c for c in coloured if c[0].get("mask") is not None]
             + [(obj, GT_COLOUR) for obj in ground_truth or ()])
  labels = []
  for obj, colour in ordered:
    text = _label_text(obj)
    if obj.get("bbox") is None or not text:
      continue
    text = _fit(measure, text, font, width - 6)
    left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
    labels.append((text, colour, _box_pixels(obj["bbox"], width, height),
                   (right - left + 6, bottom - top + 6)))
  rects = place_labels([l[2] for l in labels], [l[3] for l in labels], width, height)
  return [(text, colour, box, rect) for (text, colour, box, _), rect in zip(labels, rects)]


def _leader(draw, box, rect, colour):
  """A thin line from a label at `rect` to its `box` when the two do not touch."""
  x0, y0, x1, y1 = rect
  bx0, by0, bx1, by1 = box
  if x0 > bx1 + 2 or x1 < bx0 - 2 or y0 > by1 + 2 or y1 < by0 - 2:
    to = (min(max((x0 + x1) / 2, bx0), bx1), min(max((y0 + y1) / 2, by0), by1))
    start = (min(max(to[0], x0), x1 - 1), min(max(to[1], y0), y1 - 1))
    draw.line((start, to), fill=colour, width=1)


def _draw_label(draw, text, colour, rect, font):
  x0, y0, x1, y1 = rect
  left, top, _, _ = draw.textbbox((0, 0), text, font=font)
  draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=LABEL_BG, outline=colour)
  draw.text((x0 + 3 - left, y0 + 3 - top), text, fill=colour, font=font)


def overlay(image, objects=(), header=(), max_side=1024, *, ground_truth=None,
            header_max_lines=HEADER_MAX_LINES):
  """Draws `objects` (and `ground_truth`, dashed) on `image` with `header` text lines above it.

  Args:
    image: uint8 [H,W] or [H,W,3] radiograph.
    objects: dicts with `bbox` (normalised y_min, x_min, y_max, x_max), `label`,
      optional `score` and optional `mask` (bool [h,w] over the whole image, any
      size: it is resized to the drawing).
    header: text lines (e.g. the diagnosis and its probability) drawn on a
      dark band above the image; each is wrapped to the width and cut to
      `header_max_lines` lines ending with '…'.
    max_side: the longer side of the drawn image; larger images are shrunk.
    ground_truth: None, or dicts with `bbox` and `label` drawn as dashed
      outlines, with a legend line 'dashed = ground truth' in the header.
    header_max_lines: the most lines one header entry takes.

  Returns:
    An RGB PIL image. Labels never overlap one another and stay inside it.
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
    if obj.get("bbox") is not None:
      x0, y0, x1, y1 = _box_pixels(obj["bbox"], width, height)
      draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=PALETTE[k % len(PALETTE)],
                     width=line)
  for obj in ground_truth or ():
    _dashed_rectangle(draw, _box_pixels(obj["bbox"], width, height), line, 4 * line)
  labels = [l for l in label_layout(objects, ground_truth, (width, height), font) if l[3]]
  for _, colour, box, rect in labels:  # leader lines first: labels are drawn over them
    _leader(draw, box, rect, colour)
  for text, colour, _, rect in labels:
    _draw_label(draw, text, colour, rect, font)
  header = list(header)
  if ground_truth is not None:
    header.append(f"dashed = ground truth ({len(ground_truth)} "
                  f"{'box' if len(ground_truth) == 1 else 'boxes'})")
  return _with_header(img, header, font, header_max_lines)


def _lines(measure, text, font, width):
  """Yields the lines of `text` no wider than `width` pixels; words are kept whole
  unless one alone is too wide."""
  current = ""
  for word in text.split(" "):
    trial = f"{current} {word}" if current else word
    if measure.textlength(trial, font=font) <= width:
      current = trial
      continue
    if current:
      yield current
    while measure.textlength(word, font=font) > width:
      n = max(1, _prefix_length(measure, word, font, width))
      yield word[:n]
      word = word[n:]
    current = word
  yield current


def _wrap(measure, text, font, width, max_lines):
  """`text` (its newlines kept) in at most `max_lines` lines of `width` pixels; a cut
  text ends with '…'."""
  lines = itertools.chain.from_iterable(_lines(measure, part, font, width)
                                        for part in text.splitlines() or [""])
  out = list(itertools.islice(lines, max_lines + 1))
  if len(out) > max_lines:
    out = out[:max_lines]
    out[-1] = _fit(measure, out[-1] + ELLIPSIS, font, width)
  return out


def _with_header(img, lines, font, max_lines):
  if not lines:
    return img
  measure = ImageDraw.Draw(img)
  lines = [w for l in lines for w in _wrap(measure, str(l), font, img.width - 16, max_lines)]
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


def save_overlay(path, image, objects=(), header=(), max_side=1024, **kwargs):
  """`overlay()` written as a PNG at `path` (atomically; a symlink there is replaced)."""
  picture = overlay(image, objects, header, max_side, **kwargs)
  with atomic.target(path) as tmp:
    picture.save(tmp, format="PNG", optimize=True)
