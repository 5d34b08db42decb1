"""The phantom: deterministic, valid records, exact masks, patients with several images."""
import collections

import numpy as np
import pytest

from big_vision_cxr.data import phantom, records


@pytest.fixture(scope="module")
def recs():
  return phantom.dataset(120, seed=3, size=64, difficulty=0.0)


def test_deterministic_per_seed_and_index():
  a = phantom.generate(7, seed=1, size=64)
  b = phantom.generate(7, seed=1, size=64)
  c = phantom.generate(7, seed=2, size=64)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.patient_id == b.patient_id and a.objects.label == b.objects.label
  assert not np.array_equal(a.image, c.image)


def test_labels_and_patients(recs):
  counts = collections.Counter(r.label for r in recs)
  assert set(counts) == set(records.LABELS)
  assert counts["tb"] > 30 and counts["normal"] > 20
  per_patient = collections.defaultdict(list)
  for r in recs:
    per_patient[r.patient_id].append(r)
  assert len(per_patient) < len(recs)  # some patients have several images
  for rs in per_patient.values():
    assert len({r.label for r in rs}) == 1  # follow-ups keep the patient's label


def test_masks_boxes_and_findings_agree(recs):
  for r in recs:
    objs = r.objects
    n = len(objs)
    assert (r.label == "tb") == (n > 0)
    lung_map = r.meta["lung_mask"]
    for i in range(n):
      m = objs.mask[i]
      assert m.sum() > 0
      ys, xs = np.nonzero(m)
      np.testing.assert_allclose(objs.bbox[i], [ys.min() / 64, xs.min() / 64,
                                                (ys.max() + 1) / 64, (xs.max() + 1) / 64])
      code = 2 if objs.lung[i] == "left" else 1
      assert np.all(lung_map[m > 0] == code)  # lesion inside the named lung
      # patient left lung is on the image right
      assert (xs.mean() > 32) == (objs.lung[i] == "left")
      assert (objs.label[i] == "latent tb") == (objs.kind[i] == "calcified nodule")
    if r.label == "sick_non_tb":
      assert r.meta["findings"]["effusion"] in records.LUNGS


def _lesion_contrast(recs):
  """Median over lesions of mean grey inside the mask minus the rest of the lung."""
  diffs = []
  for r in recs:
    lung = r.meta["lung_mask"] > 0
    for m, kind in zip(r.objects.mask, r.objects.kind):
      if kind != "cavity":
        diffs.append(r.image[m > 0].mean() - r.image[lung & (m == 0)].mean())
  return len(diffs), float(np.median(diffs))


def test_lesions_visible_at_low_resolution_and_difficulty_knob(recs):
  n, easy = _lesion_contrast(recs)
  assert n > 20 and easy > 100  # difficulty 0 at 64 px: clearly visible
  _, hard = _lesion_contrast(phantom.dataset(60, seed=3, size=64, difficulty=1.0))
  assert 10 < hard < easy / 2


def test_upper_zone_bias(recs):
  zones = collections.Counter(z for r in recs for z in r.objects.zone)
  assert zones["upper"] > zones["lower"]


def test_difficulty_validated():
  with pytest.raises(ValueError, match="difficulty"):
    phantom.generate(0, difficulty=2.0)
