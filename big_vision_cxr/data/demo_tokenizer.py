"""Builds the demo tokenizer asset `big_vision_cxr/assets/cxr_demo_spm.model`.

    python -m big_vision_cxr.data.demo_tokenizer [--out PATH] [--vocab_size 1000]

The corpus is every prefix and suffix the curation produces (loc/seg tokens
stripped: they are appended pieces) on phantom records plus synthetic
TBX11K-style records covering every lesion class, kind, lung, zone and count,
effusions, and the numbers 0-99. Deterministic: the same command writes the
same file.
"""
import argparse
import re
import sys

import numpy as np

from big_vision_cxr import errors
from big_vision_cxr import tokenizer
from big_vision_cxr.data import curation, phantom, prompts, records

DEFAULT_OUT = tokenizer.DEMO_TOKENIZER
_LOC_SEG = re.compile(r"<loc\d{4}>|<seg\d{3}>")
# Common chest radiograph report vocabulary, so free-text hospital reports do not
# fall back to bytes.
RADIOLOGY_WORDS = """
abnormal abnormality acute air airspace alveolar angle angles aorta aortic apex apical apices
appearance area areas artery atelectasis basal base bases bilateral bilaterally blunting bone bones
bronchial bronchiectasis bronchovascular calcification calcifications calcified cardiac cardiomegaly
cardiomediastinal cavitary cavitation cavities cavity change changes chest chronic clavicle clear
collapse compared comparison consistent consolidation contour costophrenic cxr demonstrated dense
density diaphragm diffuse disease distribution effusion effusions elevated elevation emphysema
enlarged enlargement evidence examination exudative fibrosis fibrotic film findings fissure fluid
focal frontal granuloma granulomas granulomatous heart hemidiaphragm hilar hilum hyperinflation
hyperinflated identified impression increased infection infiltrate infiltrates inflammatory
interstitial intact involvement lateral lesion lesions linear lobe lobes lower lung lungs lymph
lymphadenopathy markings mass masses mediastinal mediastinum middle miliary mild minimal moderate
multifocal multiple nodular nodule nodules noted opacification opacities opacity parenchymal
patchy pattern pleural pneumonia pneumothorax possible post posterior prior process prominent
pulmonary reactivation recommend recommended reticular reticulonodular right left scarring seen
severe silhouette size small soft spine stable suggestive suspicious thickening tissue trachea
tracheal tree unchanged unremarkable upper volume volumes within zone zones tuberculosis tb
active latent old healed sputum smear culture follow up clinical correlation no there is are with
without and or of the in on at to from for suggest suggests likely unlikely probable compatible
""".split()


def _synthetic_records(n, seed=0):
  rng = np.random.default_rng(seed)
  image = np.zeros((8, 8), np.uint8)
  for i in range(n):
    label = records.LABELS[i % 3]
    count = int(rng.integers(1, 6)) if label == "tb" else 0
    names = [str(rng.choice(records.CLASS_NAMES)) for _ in range(count)]
    known = bool(rng.integers(2))
    kinds = [(str(rng.choice(records.KINDS[:3] if nm != "latent tb" else records.KINDS[3:]))
              if known else None) for nm in names]
    boxes = np.sort(rng.uniform(0, 1, (count, 2, 2)), axis=1).reshape(count, 4)[:, [0, 2, 1, 3]]
    objs = records.Objects(
        bbox=boxes.astype(np.float32), label=names,
        lung=[str(rng.choice(records.LUNGS)) for _ in names] if known else None,
        zone=[str(rng.choice(records.ZONES)) for _ in names] if known else None, kind=kinds)
    findings = {"effusion": str(rng.choice(records.LUNGS))} if label == "sick_non_tb" and i % 2 else {}
    yield records.SourceRecord(f"syn{i}", f"syn{i}", "synthetic", image, label, objs,
                               meta={"findings": findings})


def corpus_lines(n_phantom=400, n_synthetic=3000):
  class_names = records.CLASS_NAMES[:2]
  recs = list(phantom.dataset(n_phantom, size=48)) + list(_synthetic_records(n_synthetic))
  lines = []
  for rec in recs:
    for ex in curation.curate(rec, class_names=class_names, tasks=prompts.TASKS[:4]):
      lines += [ex.prefix, _LOC_SEG.sub("", ex.suffix).strip()]
  for names in (records.CLASS_NAMES[:2], records.CLASS_NAMES, records.CLASS_NAMES[:1]):
    lines += list(prompts.all_prefixes(names))
  lines += [str(i) for i in range(100)]
  lines += [" ".join(RADIOLOGY_WORDS[i:i + 12]) for i in range(0, len(RADIOLOGY_WORDS), 12)]
  lines += RADIOLOGY_WORDS
  return [l for l in lines if l]


def run(argv):
  parser = errors.ArgumentParser(prog="python -m big_vision_cxr.data.demo_tokenizer",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=str(DEFAULT_OUT))
  parser.add_argument("--vocab_size", type=int, default=1000)
  args = parser.parse_args(argv)
  tok = tokenizer.train(corpus_lines(), args.out, vocab_size=args.vocab_size)
  print(f"wrote {args.out}: base vocabulary {tok.base_size}, total {tok.vocab_size}")
  return 0


def main(argv=None):
  return errors.cli_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
