"""Deterministic patient-level splits: never the same patient in two splits.

A record keeps a split a source gives it (e.g. the TBX11K lists); a patient
whose images carry two different given splits is an error naming the patient.
A patient with no given split is placed by a hash of (seed, patient_id):
sha256 -> a number u in [0, 1) -> train if u < f_train, val if u < f_train +
f_val, else test. The same seed and ids always give the same splits, whatever
the order or number of records.
"""
import collections
import hashlib

from big_vision_cxr import errors

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class SplitError(errors.Error):
  """A patient would land in two splits, or the fractions are invalid."""


def unit_hash(seed, patient_id):
  digest = hashlib.sha256(f"{seed}\x00{patient_id}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def assign(patient_id, seed=0, fractions=DEFAULT_FRACTIONS):
  """The split of one patient from the hash of (seed, patient_id)."""
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise SplitError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  u = unit_hash(seed, patient_id)
  return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def given_splits(recs):
  """{patient_id: split} from the records' given splits; SplitError on a conflict."""
  seen = collections.defaultdict(set)
  images = collections.defaultdict(list)
  for r in recs:
    if r.split is not None:
      seen[r.patient_id].add(r.split)
      images[r.patient_id].append(f"{r.image_id}:{r.split}")
  for pid, splits in seen.items():
    if len(splits) > 1:
      raise SplitError(f"patient {pid!r} appears in several given splits {sorted(splits)}: "
                       f"{', '.join(images[pid][:6])}")
  return {pid: s.pop() for pid, s in seen.items()}


def apply(recs, seed=0, fractions=DEFAULT_FRACTIONS):
  """Sets `split` on every record (in place) and returns the records."""
  given = given_splits(recs)
  for r in recs:
    r.split = given.get(r.patient_id) or assign(r.patient_id, seed, fractions)
  check_disjoint(recs)
  return recs


def check_disjoint(recs):
  """Raises SplitError if any patient has images in two splits."""
  by_patient = collections.defaultdict(set)
  for r in recs:
    by_patient[r.patient_id].add(r.split)
  bad = {pid: sorted(s) for pid, s in by_patient.items() if len(s) > 1}
  if bad:
    pid, s = next(iter(bad.items()))
    raise SplitError(f"{len(bad)} patients are in several splits, e.g. {pid!r} in {s}")
