"""Overlays: masks blended, boxes at the right pixels, labels and header legible, bad input named."""
import numpy as np
import pytest

from big_vision_cxr import visualize


def _grey(h=200, w=300, value=128):
  return np.full((h, w), value, np.uint8)


def test_box_outline_at_normalised_position():
  img = visualize.overlay(_grey(), [dict(bbox=[0.25, 0.5, 0.75, 0.9], label="")])
  px = np.asarray(img)
  assert img.size == (300, 200)
  colour = visualize.PALETTE[0]
  # Left edge of the box: x = 0.5 * 300 = 150, rows 50..150.
  assert tuple(px[100, 150]) == colour
  assert tuple(px[60, 150]) == colour
  # Inside and outside the box the radiograph is untouched.
  assert tuple(px[100, 200]) == (128, 128, 128)
  assert tuple(px[20, 20]) == (128, 128, 128)


def test_mask_is_alpha_blended_only_inside():
  mask = np.zeros((200, 300), bool)
  mask[10:40, 20:60] = True
  img = visualize.overlay(_grey(), [dict(bbox=None, label="x", mask=mask)])
  px = np.asarray(img).astype(int)
  colour = np.array(visualize.PALETTE[0])
  want = np.round((1 - visualize.MASK_ALPHA) * 128 + visualize.MASK_ALPHA * colour)
  np.testing.assert_array_equal(px[25, 40], want)
  np.testing.assert_array_equal(px[100, 200], [128, 128, 128])
  assert (np.abs(px - 128).sum(-1) > 0).sum() == mask.sum()


def test_small_mask_is_resized_to_image():
  mask = np.zeros((4, 6), bool)
  mask[:2, :3] = True  # top-left quarter of the image
  px = np.asarray(visualize.overlay(_grey(), [dict(mask=mask, label="")]))
  changed = np.abs(px.astype(int) - 128).sum(-1) > 0
  assert changed[:100, :150].all() and not changed[100:, :].any() and not changed[:, 150:].any()


def test_label_and_header_are_drawn_on_dark_boxes():
  img = visualize.overlay(_grey(), [dict(bbox=[0.5, 0.1, 0.9, 0.4], label="active tb", score=0.87)],
                          header=["diagnosis: tb  P(tb)=0.91"])
  px = np.asarray(img)
  assert img.width == 300 and img.height > 200
  band = img.height - 200
  # The header band is dark with white text; the radiograph sits below it.
  assert px[:band].mean() < 60 and (px[:band] == 255).all(-1).any()
  assert tuple(px[band + 5, 5]) == (128, 128, 128)
  # The label box sits just above the top-left corner of the box (y = 100 + band).
  label = px[band + 80:band + 100, 30:120]
  assert (label == 0).all(-1).sum() > 100
  assert (label == visualize.PALETTE[0]).all(-1).any()


def test_long_header_wraps_inside_width():
  short = visualize.overlay(_grey(), header=["report: clear"])
  long = visualize.overlay(_grey(), header=["report: " + "bilateral upper zone opacities " * 8])
  assert long.width == short.width == 300
  assert long.height > short.height + 20
  two = visualize.overlay(_grey(), header=["report: line one\nline two"])  # model text may hold "\n"
  assert two.height > short.height + 10


def test_large_image_is_shrunk_to_max_side():
  img = visualize.overlay(_grey(2000, 1000), [dict(bbox=[0, 0, 1, 1], label="a")], max_side=500)
  assert img.size == (250, 500)


def test_rgb_input_and_save(tmp_path):
  rgb = np.stack([_grey()] * 3, -1)
  path = tmp_path / "o.png"
  visualize.save_overlay(path, rgb, [dict(bbox=[0.1, 0.1, 0.2, 0.2], label="x")], header=["h"])
  from PIL import Image
  with Image.open(path) as im:
    assert im.format == "PNG" and im.mode == "RGB" and im.width == 300


@pytest.mark.parametrize("image,match", [
    (np.zeros((10, 10), np.float32), "uint8"),
    (np.zeros((10, 10, 4), np.uint8), "shape"),
])
def test_bad_image_is_named(image, match):
  with pytest.raises(visualize.VisualizeError, match=match):
    visualize.overlay(image)


def test_bad_mask_is_named():
  with pytest.raises(visualize.VisualizeError, match="mask"):
    visualize.overlay(_grey(), [dict(mask=np.zeros((2, 3, 4), bool), label="")])
