"""The exact prompt (prefix) and answer (suffix) strings of the five tasks.

Evaluators compare model output with these strings, so they are constants here
and documented in docs/DATA.md. Left/right always mean the PATIENT's side.
"""
TASKS = ("diagnosis", "vqa", "report", "detection", "segmentation")  # index = task_id

DIAGNOSIS_PREFIX = "answer en what is the diagnosis?"
DIAGNOSIS_ANSWERS = {
    "tb": "tuberculosis",
    "normal": "normal",
    "sick_non_tb": "abnormal, not tuberculosis",
}

YES, NO = "yes", "no"
Q_TB = "answer en is there tuberculosis?"
Q_LEFT = "answer en is the left lung affected?"
Q_RIGHT = "answer en is the right lung affected?"
Q_CAVITY = "answer en is there a cavity?"
CLOSED_QUESTIONS = (Q_TB, Q_LEFT, Q_RIGHT, Q_CAVITY)

Q_WHICH_LUNG = "answer en which lung is affected?"  # left | right | both | none
Q_HOW_MANY = "answer en how many lesions are there?"  # 0, 1, 2, ...
Q_WHICH_ZONE = "answer en which zone is most affected?"  # upper | middle | lower | none
OPEN_QUESTIONS = (Q_WHICH_LUNG, Q_HOW_MANY, Q_WHICH_ZONE)
LUNG_ANSWERS = ("left", "right", "both", "none")
ZONE_ANSWERS = ("upper", "middle", "lower", "none")

REPORT_PREFIX = "caption en"


def _class_list(class_names):
  names = sorted(set(class_names))
  if not names:
    raise ValueError("detection/segmentation prompts need at least one class name.")
  return " ; ".join(names)


def detect_prefix(class_names):
  """'detect ' + the dataset's class names, sorted, joined by ' ; '."""
  return "detect " + _class_list(class_names)


def segment_prefix(class_names):
  """'segment ' + the dataset's class names, sorted, joined by ' ; '."""
  return "segment " + _class_list(class_names)


def all_prefixes(class_names):
  """Every fixed prefix (for tokenizer corpora and evaluators)."""
  return (DIAGNOSIS_PREFIX, *CLOSED_QUESTIONS, *OPEN_QUESTIONS, REPORT_PREFIX,
          detect_prefix(class_names), segment_prefix(class_names))


def task_prompts(class_names):
  """{task: prefix} as training asks, with 'vqa' the list of questions; no object
  prompts when there are no class names."""
  out = dict(diagnosis=DIAGNOSIS_PREFIX, vqa=[*CLOSED_QUESTIONS, *OPEN_QUESTIONS],
             report=REPORT_PREFIX)
  if class_names:
    out.update(detection=detect_prefix(class_names), segmentation=segment_prefix(class_names))
  return out
