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


def _disjoint(a, b):
  return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_crowded_labels_never_overlap_and_stay_inside(monkeypatch):
  """12 overlapping boxes of two kinds (4 with masks) and 2 ground-truth boxes."""
  rng = np.random.default_rng(0)
  objects = []
  for k in range(12):
    y, x = rng.uniform(0.3, 0.45, 2)
    obj = dict(bbox=[y, x, y + 0.2, x + 0.25], label=("active tb", "latent tb")[k % 2],
               score=rng.uniform())
    if k >= 8:
      obj["mask"] = np.zeros((200, 300), bool)
      obj["mask"][round(y * 200):round((y + 0.2) * 200), round(x * 300):round((x + 0.25) * 300)] = True
    objects.append(obj)
  truth = [dict(bbox=[0.35, 0.35, 0.6, 0.6], label="active tb"), dict(bbox=[0.4, 0.4, 0.5, 0.5], label="latent tb")]
  layouts = []
  layout = visualize.label_layout
  monkeypatch.setattr(visualize, "label_layout", lambda *a: layouts.append(layout(*a)) or layouts[-1])
  img = visualize.overlay(_grey(), objects, ground_truth=truth)
  labels = layouts[0]
  rects = [rect for _, _, _, rect in labels]
  assert len(rects) == 14 and None not in rects
  assert all(0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= 200 for x0, y0, x1, y1 in rects)
  assert all(_disjoint(a, b) for i, a in enumerate(rects) for b in rects[i + 1:])
  # Box labels are placed first (nearest their boxes), then the masks', then the truth's.
  colours = [colour for _, colour, _, _ in labels]
  assert colours[:8] == [visualize.PALETTE[k % 8] for k in range(8)]
  assert colours[-2:] == [visualize.GT_COLOUR] * 2
  assert labels[0][3][3] == round(objects[0]["bbox"][0] * 200)  # the first sits on its box


def test_place_labels_above_below_inside_then_shifted():
  boxes = [(10, 30, 60, 80)] * 4
  rects = visualize.place_labels(boxes, [(40, 10)] * 4, 100, 100)
  assert rects[:3] == [(10, 20, 50, 30), (10, 80, 50, 90), (10, 30, 50, 40)]
  assert rects[3] == (10, 70, 50, 80)  # inside the box's bottom
  assert visualize.place_labels([(0, 0, 5, 5)], [(200, 10)], 100, 100) == [None]  # too wide
  full = visualize.place_labels([(0, 0, 100, 100)] * 3, [(100, 50)] * 3, 100, 100)
  assert full == [(0, 0, 100, 50), (0, 50, 100, 100), None]  # no free place left: not drawn


@pytest.mark.parametrize("report", ["tuberculosis " * 80, "<loc0123>" * 80, "tb\n" * 80])
def test_degenerate_report_is_cut_to_three_lines(report):
  img = visualize.overlay(_grey(), header=["report: " + report])
  three = visualize.overlay(_grey(), header=["report: a\nb\nc"])
  assert img.width == 300 and img.height - 200 <= three.height - 200 + 6
  measure = visualize.ImageDraw.Draw(img)
  font = visualize._font(12)
  lines = visualize._wrap(measure, "report: " + report, font, 284, 3)
  assert len(lines) == 3 and lines[-1].endswith(visualize.ELLIPSIS)
  assert all(measure.textlength(l, font=font) <= 284 for l in lines)


def test_short_header_is_not_cut():
  measure = visualize.ImageDraw.Draw(visualize.Image.new("RGB", (1, 1)))
  lines = visualize._wrap(measure, "diagnosis: tb   P(tb) = 0.91", visualize._font(12), 284, 3)
  assert lines == ["diagnosis: tb   P(tb) = 0.91"]


def test_ground_truth_is_dashed_with_a_legend():
  plain = np.asarray(visualize.overlay(_grey()))
  img = visualize.overlay(_grey(), ground_truth=[dict(bbox=[0.25, 0.5, 0.75, 0.9], label="")])
  px = np.asarray(img)
  band = img.height - 200
  assert band > 0 and plain.shape[0] == 200  # the legend line is the only header
  assert (px[:band] == 255).all(-1).any()
  top = px[band + 50, 150:270]  # the box's top edge, y = 50, x = 150..270
  dash = (top == visualize.GT_COLOUR).all(-1)
  gap = (top == visualize.GT_GAP).all(-1)
  assert dash.sum() > 30 and gap.sum() > 30 and (dash | gap).all()
  assert np.diff(dash.astype(int)).any()  # alternates: dashed, not solid
  assert (px[band + 100, 200] == 128).all() and (px[band + 20, 20] == 128).all()
  assert tuple(px[band + 100, 150]) in (visualize.GT_COLOUR, visualize.GT_GAP)  # left edge
