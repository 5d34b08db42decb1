"""Whether one image's task outputs agree: diagnosis, report, VQA answers and lesions.

Pure functions on a predict result dict (docs/SERVING.md §1). `check(result,
min_score)` returns the JSON block

  {"agree": bool, "checked": [codes of the rules evaluated], "flags": [{"code", "message"}]}

A rule is evaluated only when the outputs it compares are there and readable (a
VQA answer that is not yes/no, or not a number, skips its rules). Lesions are the
boxes and masks with a score >= min_score, i.e. what the overlay draws; their side
is the patient's, as the data defines it (`records.lung_and_zone`: a box centred
in the image's right half is in the patient's LEFT lung). Rules (code: flagged when):

  diagnosis_vs_vqa_tb   diagnosis tb but 'is there tuberculosis?' no, or not tb but yes
  diagnosis_vs_report   diagnosis tb but the report denies tuberculosis, or not tb but
                        the report affirms it ('no evidence of tuberculosis' denies)
  not_tb_with_lesions   diagnosis normal or sick_non_tb but lesions are drawn
  tb_without_lesions    diagnosis tb, detection or segmentation ran, no lesion drawn
  vqa_tb_vs_count       'is there tuberculosis?' yes but 'how many lesions?' 0, or no but > 0
  count_vs_boxes        'how many lesions?' N but another number of boxes drawn
                        (detection's boxes; segmentation's masks without detection)
  left_lung_vs_boxes    'is the left lung affected?' yes but no lesion in the patient's
                        left lung, or no but one there
  right_lung_vs_boxes   the same for the right lung
  which_lung_vs_boxes   'which lung is affected?' (left|right|both|none) vs the lesions' sides
  which_lung_vs_closed  'which lung is affected?' vs the two closed left/right answers
  report_side_vs_boxes  the lungs the report names ('left lung: ...') vs the lesions' sides
"""
import re

from big_vision_cxr.data import prompts
from big_vision_cxr.data import records

RULES = ("diagnosis_vs_vqa_tb", "diagnosis_vs_report", "not_tb_with_lesions",
         "tb_without_lesions", "vqa_tb_vs_count", "count_vs_boxes", "left_lung_vs_boxes",
         "right_lung_vs_boxes", "which_lung_vs_boxes", "which_lung_vs_closed",
         "report_side_vs_boxes")
_SIDES_OF_ANSWER = {"left": {"left"}, "right": {"right"}, "both": {"left", "right"}, "none": set()}
_TB = re.compile(r"\b(tuberculosis|tb)\b")
_NEGATION = re.compile(r"\b(no|not|without|negative for|free of)\b")
_REPORT_SIDE = re.compile(r"\b(left|right) lung\b")


def shown(obj, min_score):
  """Whether the overlay draws a box or mask entry: unscored, or score >= min_score."""
  return obj.get("score") is None or obj["score"] >= min_score


def report_tb(report):
  """True when a sentence of `report` affirms tuberculosis, else False when one denies
  it ('no evidence of tuberculosis'), None when it does not mention it."""
  said = {not _NEGATION.search(s) for s in re.split(r"[.;\n]", report.lower()) if _TB.search(s)}
  return True if True in said else False if said else None


def report_sides(report):
  """The lungs a report names ('right lung: ...'), the patient's sides."""
  return set(_REPORT_SIDE.findall(report.lower()))


def answers(result):
  """{'answer en <question>': answer (lower case)} of the VQA task and free VQA prompts."""
  out = {f"answer en {a['question']}": a["answer"] for a in result.get("answers", [])}
  out.update({p["prompt"].strip(): p["text"] for p in result.get("prompts", [])
              if p["prompt"].strip().startswith("answer en ")})
  return {q: str(a).strip().lower() for q, a in out.items()}


def _yes_no(answer):
  return {prompts.YES: True, prompts.NO: False}.get(answer)


def _count(answer):
  return int(answer) if answer is not None and answer.isdigit() else None


def _side(obj):
  return records.lung_and_zone(obj["bbox"])[0]


def _where(sides):
  if len(sides) == 2:
    return "both lungs"
  side = next(iter(sides))
  return f"the patient's {side} lung (image {'right' if side == 'left' else 'left'})"


def _lesions(sides, drawn):
  return f"lesions {drawn} in {_where(sides)}" if sides else f"no lesion {drawn}"


def _plural(n, one, many):
  return f"{n} {one if n == 1 else many}"


def check(result, min_score=0.0):
  """The consistency block of `result` (see the module doc)."""
  checked, flags = [], []

  def rule(code, disagree, message):
    checked.append(code)
    if disagree:
      flags.append(dict(code=code, message=message))

  diagnosis = (result.get("diagnosis") or {}).get("label")
  said = f"diagnosis '{prompts.DIAGNOSIS_ANSWERS.get(diagnosis)}'"
  qa = answers(result)
  tb_answer, count = qa.get(prompts.Q_TB), _count(qa.get(prompts.Q_HOW_MANY))
  tb_yes = _yes_no(tb_answer)
  localised = "boxes" in result or "masks" in result
  lesions = [o for key in ("boxes", "masks") for o in result.get(key, [])
             if o.get("bbox") is not None and shown(o, min_score)]
  sides = {_side(o) for o in lesions}
  drawn = f"drawn (score >= {min_score:g})" if min_score > 0 else "drawn"

  if diagnosis and tb_yes is not None:
    rule("diagnosis_vs_vqa_tb", (diagnosis == "tb") != tb_yes,
         f"{said} but VQA 'is there tuberculosis?' {tb_answer}.")
  report = result.get("report")
  says_tb = report_tb(report) if report else None
  if diagnosis and says_tb is not None:
    rule("diagnosis_vs_report", (diagnosis == "tb") != says_tb,
         f"{said} but the report {'affirms' if says_tb else 'denies'} tuberculosis.")
  if diagnosis and localised:
    if diagnosis == "tb":
      rule("tb_without_lesions", not lesions, f"{said} but no lesion {drawn}.")
    else:
      best = max((o["score"] for o in lesions if o.get("score") is not None), default=None)
      rule("not_tb_with_lesions", bool(lesions),
           f"{said} but {_plural(len(lesions), 'lesion', 'lesions')} {drawn}"
           + ("" if best is None else f", best score {best:.2f}") + ".")
  if tb_yes is not None and count is not None:
    rule("vqa_tb_vs_count", tb_yes != (count > 0),
         f"VQA 'is there tuberculosis?' {tb_answer} but 'how many lesions?' {count}.")
  if count is not None and localised:
    key, one = ("boxes", "box") if "boxes" in result else ("masks", "mask")
    n = sum(shown(o, min_score) for o in result[key])
    rule("count_vs_boxes", n != count,
         f"VQA 'how many lesions?' {count} but {_plural(n, one, key)} {drawn}.")
  closed = {}
  for side, question in (("left", prompts.Q_LEFT), ("right", prompts.Q_RIGHT)):
    closed[side] = _yes_no(qa.get(question))
    if closed[side] is not None and localised:
      rule(f"{side}_lung_vs_boxes", closed[side] != (side in sides),
           f"VQA 'is the {side} lung affected?' {qa[question]} but "
           f"{'no lesion' if closed[side] else 'a lesion'} {drawn} in {_where({side})}.")
  which = qa.get(prompts.Q_WHICH_LUNG)
  if which in _SIDES_OF_ANSWER:
    if localised:
      rule("which_lung_vs_boxes", _SIDES_OF_ANSWER[which] != sides,
           f"VQA 'which lung is affected?' {which} but {_lesions(sides, drawn)}.")
    if None not in closed.values():
      implied = {s for s, yes in closed.items() if yes}
      rule("which_lung_vs_closed", _SIDES_OF_ANSWER[which] != implied,
           f"VQA 'which lung is affected?' {which} but 'is the left lung affected?' "
           f"{qa[prompts.Q_LEFT]} and 'is the right lung affected?' {qa[prompts.Q_RIGHT]}.")
  named = report_sides(report) if report else set()
  if named and localised:
    rule("report_side_vs_boxes", named != sides,
         f"the report names {_where(named)} but {_lesions(sides, drawn)}.")
  return dict(agree=not flags, checked=checked, flags=flags)
